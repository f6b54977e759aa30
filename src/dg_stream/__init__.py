"""dg_stream: lossless speculative decoding with a diffusion drafter, as an async stream.

``import dg_stream`` needs neither torch nor transformers; the local backend imports them when
it is first used and says which extra to install when they are missing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._backends.base import Backend
from ._chat import ChatReply, ChatSession
from ._chunks import Chunk, FinishReason, Stats, StepStats, Usage
from ._config import (
    GenerationRequest,
    Message,
    ResponseFormat,
    SamplingParams,
    SpeculativeConfig,
    StaticShapes,
)
from ._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    BadRequestError,
    DGStreamError,
    GenerationError,
    InvalidRequestError,
    MissingDependencyError,
    ModelLoadError,
    OverloadedError,
    StreamInterruptedError,
    VocabularyMismatchError,
)
from ._generate import generate
from ._operators import (
    DerivedStream,
    Operator,
    by_lines,
    by_sentences,
    by_words,
    collect,
    map_text,
    stop_at,
    tee,
    until,
    with_timeout,
)
from ._stream import Completion, GenerationStream
from ._tools import FunctionTool, ToolCall, ToolCallReader, ToolChoice, tool_call_format

if TYPE_CHECKING:
    from ._backends.local import LocalBackend
    from ._backends.remote import RemoteBackend, RemoteTimeout
    from ._drafters.base import (
        Drafter,
        DrafterTraits,
        DraftProposal,
        DraftRequest,
        DraftSession,
        propose_each,
    )

__version__ = "0.1.0"

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "Backend",
    "BadRequestError",
    "ChatReply",
    "ChatSession",
    "Chunk",
    "Completion",
    "DGStreamError",
    "DerivedStream",
    "DraftProposal",
    "DraftRequest",
    "DraftSession",
    "Drafter",
    "DrafterTraits",
    "FinishReason",
    "FunctionTool",
    "GenerationError",
    "GenerationRequest",
    "GenerationStream",
    "InvalidRequestError",
    "LocalBackend",
    "Message",
    "MissingDependencyError",
    "ModelLoadError",
    "Operator",
    "OverloadedError",
    "RemoteBackend",
    "RemoteTimeout",
    "ResponseFormat",
    "SamplingParams",
    "SpeculativeConfig",
    "StaticShapes",
    "Stats",
    "StepStats",
    "StreamInterruptedError",
    "ToolCall",
    "ToolCallReader",
    "ToolChoice",
    "Usage",
    "VocabularyMismatchError",
    "__version__",
    "by_lines",
    "by_sentences",
    "by_words",
    "collect",
    "generate",
    "map_text",
    "propose_each",
    "stop_at",
    "tee",
    "tool_call_format",
    "until",
    "with_timeout",
]

_LAZY = {
    "LocalBackend": ("._backends.local", "LocalBackend"),
    # The drafter contract, for drafters of one's own (torch: lazy too).
    **{
        name: ("._drafters.base", name)
        for name in (
            "DraftProposal",
            "DraftRequest",
            "DraftSession",
            "Drafter",
            "DrafterTraits",
            "propose_each",
        )
    },
    # httpx only (no torch); lazy so that ``import dg_stream`` stays quick.
    "RemoteBackend": ("._backends.remote", "RemoteBackend"),
    "RemoteTimeout": ("._backends.remote", "RemoteTimeout"),
}


def __getattr__(name: str) -> Any:
    # Heavy backends load on first access so that remote-only users never import torch.
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dg_stream' has no attribute {name!r}")
