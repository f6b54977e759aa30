"""dg_stream's exception hierarchy: every error a user can see derives from DGStreamError."""

from __future__ import annotations

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "BadRequestError",
    "DGStreamError",
    "GenerationError",
    "InvalidRequestError",
    "MissingDependencyError",
    "ModelLoadError",
    "OverloadedError",
    "StreamInterruptedError",
    "VocabularyMismatchError",
]


class DGStreamError(Exception):
    """Base class of every dg_stream error."""


class InvalidRequestError(DGStreamError, ValueError):
    """A parameter or prompt is invalid; raised before any model work starts.

    ``param`` names the offending parameter when there is one; ``code`` says what is wrong
    in a word, where the raiser knows more than "a bad value" (``"context_length_exceeded"``:
    the prompt and ``max_new_tokens`` do not fit the model's context). A server answers with
    it as the error body's ``code``; without one it says ``"invalid_value"``.
    """

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class MissingDependencyError(DGStreamError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def install_hint(*extras: str) -> str:
    """The command that installs ``extras``, for every hint and doc that names one.

    dg_stream is not on PyPI, so a command naming the package finds nothing there: the
    extras are installed from a checkout of the repository.
    """
    return f"pip install '.[{','.join(extras)}]' in a dg_stream checkout"


def missing_extra(what: str, extras: tuple[str, ...], exc: ImportError) -> MissingDependencyError:
    """The error for ``what`` needing ``extras`` that ``exc`` shows are not installed."""
    # A MissingDependencyError already (from a module that checks its own extra) names the
    # missing module only in its cause.
    cause = exc.__cause__ if exc.name is None else None
    module = exc.name or (cause.name if isinstance(cause, ImportError) else None)
    # The distribution, not the submodule that happened to be imported first.
    name = module.partition(".")[0] if module else str(exc)
    return MissingDependencyError(f"{what} needs {name}: {install_hint(*extras)}")


class ModelLoadError(DGStreamError):
    """A model, tokenizer or checkpoint could not be loaded."""


class VocabularyMismatchError(ModelLoadError):
    """The drafter and the verifier do not share a vocabulary."""


class GenerationError(DGStreamError):
    """Model work failed while generating; ``text`` holds what was produced before the failure."""

    def __init__(self, message: str, *, text: str = "") -> None:
        super().__init__(message)
        self.text = text


class APIConnectionError(GenerationError):
    """The server could not be reached (or the connection broke before any output)."""


class APITimeoutError(APIConnectionError):
    """A connect, first-chunk, idle or total timeout expired."""


class APIStatusError(GenerationError):
    """The server answered with an error status; ``status_code`` and ``body`` say which."""

    def __init__(
        self, message: str, *, status_code: int, body: object = None, text: str = ""
    ) -> None:
        super().__init__(message, text=text)
        self.status_code = status_code
        self.body = body


class BadRequestError(APIStatusError, InvalidRequestError):
    """The server rejected the request as invalid (400/422); ``param`` names the culprit and
    ``code`` is the error body's code, when the server sent them.

    Also an ``InvalidRequestError``, so one ``except`` covers local and remote validation.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: object = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        APIStatusError.__init__(self, message, status_code=status_code, body=body)
        self.message = message
        self.param = param
        self.code = code


class OverloadedError(APIStatusError):
    """The server is at capacity (429/503); ``retry_after`` is its advice in seconds."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        retry_after: float | None = None,
        body: object = None,
    ) -> None:
        super().__init__(message, status_code=status_code, body=body)
        self.retry_after = retry_after


class StreamInterruptedError(GenerationError):
    """The stream broke after output had started; ``text`` carries everything received."""
