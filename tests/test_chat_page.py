"""The chat page served at ``/``, driven in a real headless chromium (Debian's, via playwright).

Skipped, with the reason, where no chromium or no playwright package is installed. Screenshots
go to ``test-artifacts/``.
"""

from __future__ import annotations

import itertools
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from dg_stream import ChatSession, Chunk, GenerationRequest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = next(
    (p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p),
    None,
)

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)"),
]
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed (dev extra)"
)

MAX_TOKENS = 40


class PacedBackend:
    """The tiny local backend, paced so that streaming is visible to the browser."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.delay = delay
        self.requests: list[GenerationRequest] = []
        self.closed_streams = 0

    def __getattr__(self, name: str) -> Any:  # tokenizer, verifier, model_name, ...
        return getattr(self.inner, name)

    def stream(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        self.requests.append(request)
        return self._run(request)

    async def _run(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        agen = self.inner.stream(request)
        try:
            async for chunk in agen:
                await anyio.sleep(self.delay)
                yield chunk
        finally:
            await agen.aclose()
            self.closed_streams += 1

    async def aclose(self) -> None:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_backend: Any) -> Iterator[tuple[str, PacedBackend]]:
    import uvicorn

    from dg_stream.server import create_app

    backend = PacedBackend(tiny_backend, delay=0.04)
    port = _free_port()
    config = uvicorn.Config(
        create_app(backend, model_name="tiny-test"),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", backend
    uv.should_exit = True
    thread.join(timeout=15)


@pytest.fixture(scope="module")
def page(server: tuple[str, PacedBackend]) -> Iterator[Any]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"]
        )
        context = browser.new_context(viewport={"width": 1000, "height": 720})
        page = context.new_page()
        page.set_default_timeout(60_000)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server[0] + "/")
        yield page
        assert errors == [], f"JavaScript errors on the page: {errors}"
        browser.close()


# Records every value the committed and draft spans of the newest reply take.
OBSERVER = """
() => {
  window.__seen = { committed: [], draft: [] };
  new MutationObserver((records) => {
    for (const r of records) {
      const span = r.target.closest ? r.target.closest('.msg.assistant span') : null;
      if (!span) continue;
      const key = span.classList.contains('committed') ? 'committed'
                : span.classList.contains('draft') ? 'draft' : null;
      if (key) for (const n of r.addedNodes) window.__seen[key].push(n.textContent);
    }
  }).observe(document.getElementById('messages'), { childList: true, subtree: true });
}
"""


def _expected_replies(tiny_backend: Any, messages: list[str]) -> list[str]:
    """The library's own replies, computed on a thread of its own: playwright's sync API
    keeps an event loop running on this one."""
    replies: list[str] = []

    async def main() -> None:
        chat = ChatSession(tiny_backend, max_new_tokens=MAX_TOKENS)
        replies.extend([await chat.ask(m) for m in messages])

    worker = threading.Thread(target=anyio.run, args=(main,))
    worker.start()
    worker.join(timeout=60)
    return replies


def test_reply_streams_in_with_drafts_and_equals_the_servers_text(
    page: Any, server: tuple[str, PacedBackend], tiny_backend: Any
) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny-test')")
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.evaluate(OBSERVER)

    page.fill("#input", "def add(a, b):")
    page.press("#input", "Enter")
    reply = page.locator(".msg.assistant").last
    # Mid-stream: committed text and a provisional draft are both on screen.
    page.wait_for_function("""() => {
        const m = [...document.querySelectorAll('.msg.assistant')].pop();
        return m && m.dataset.state === 'streaming'
            && m.querySelector('.committed').textContent.length > 0
            && m.querySelector('.draft').textContent.length > 0; }""")
    page.screenshot(path=str(ARTIFACTS / "chat_page_streaming.png"))
    page.wait_for_function(
        "[...document.querySelectorAll('.msg.assistant')].pop().dataset.state !== 'streaming'"
    )
    assert reply.get_attribute("data-state") == "done"
    first = reply.locator(".committed").text_content()

    seen = page.evaluate("window.__seen")
    committed_states = [s for s in seen["committed"] if s]
    assert len(committed_states) >= 3  # it streamed in, piece by piece
    for before, after in itertools.pairwise(committed_states):
        assert after.startswith(before)  # committed text only grows
    assert any(seen["draft"])  # the draft was shown
    assert reply.locator(".draft").text_content() == ""  # and is gone at the end

    # The draft looks different from committed text.
    style = "(el) => { const s = getComputedStyle(el); return [s.color, s.fontStyle]; }"
    assert page.eval_on_selector(".msg.assistant .draft", style) != page.eval_on_selector(
        ".msg.assistant .committed", style
    )

    # A second turn carries the first as history; both equal the library's own replies.
    page.fill("#input", "and again")
    page.press("#input", "Enter")
    page.wait_for_function("""() => { const m = [...document.querySelectorAll('.msg.assistant')];
        return m.length === 2 && m[1].dataset.state === 'done'; }""")
    second = page.locator(".msg.assistant").last.locator(".committed").text_content()
    assert [first, second] == _expected_replies(tiny_backend, ["def add(a, b):", "and again"])
    request = server[1].requests[-1]
    assert request.messages is not None and len(request.messages) == 3
    assert request.draft_preview and request.max_new_tokens == MAX_TOKENS

    stats = page.locator("#stats")
    tps = float(stats.locator("[data-stat=tokens-per-second]").text_content() or "0")
    accepted = stats.locator("[data-stat=accepted-per-call]").text_content()
    assert tps > 0
    assert f"{MAX_TOKENS}</b> tokens" in stats.inner_html()
    assert accepted is not None and float(accepted) >= 0
    assert "finished: length" in (stats.text_content() or "")
    page.screenshot(path=str(ARTIFACTS / "chat_page.png"), full_page=True)


def test_stop_button_ends_the_reply_and_the_work(
    page: Any, server: tuple[str, PacedBackend]
) -> None:
    backend = server[1]
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    page.fill("#max-tokens", "300")
    closed_before = backend.closed_streams
    page.fill("#input", "a long one please")
    page.press("#input", "Enter")
    page.wait_for_function("""() => { const m = [...document.querySelectorAll('.msg.assistant')]
        .pop(); return m.dataset.state === 'streaming'
        && m.querySelector('.committed').textContent.length > 0; }""")
    page.click("#stop")
    last = page.locator(".msg.assistant").last
    page.wait_for_function(
        "[...document.querySelectorAll('.msg.assistant')].pop().dataset.state === 'stopped'"
    )
    assert "not kept" in (last.locator(".note").text_content() or "")
    deadline = time.monotonic() + 10
    while backend.closed_streams == closed_before:  # the server noticed and stopped the model
        assert time.monotonic() < deadline, "the generation went on after Stop"
        time.sleep(0.05)
    assert page.is_enabled("#send")


# For every text node in the header: the distinct line tops it is laid out on (1: no wrap).
HEADER_LINES = """
() => {
  const out = [];
  const walker = document.createTreeWalker(document.querySelector('header'),
                                           NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (!node.textContent.trim() || node.parentElement.closest('[hidden]')) continue;
    const range = document.createRange();
    range.selectNodeContents(node);
    const tops = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
    out.push([node.textContent.trim(), tops.size]);
  }
  return out;
}
"""
# The vertical centre of each of the header's items.
HEADER_ROWS = """
() => [...document.querySelector('header').children]
  .filter((el) => el.getBoundingClientRect().width > 0)
  .map((el) => { const r = el.getBoundingClientRect(); return Math.round(r.top + r.height / 2); })
"""


@pytest.mark.parametrize("width", [1200, 800])
def test_the_header_stays_on_one_line(
    width: int, page: Any, server: tuple[str, PacedBackend]
) -> None:
    """Screenshots at desktop widths: no word of the header wraps, its items share one row,
    and a reply that begins with blank lines is shown from its first line of text."""
    ARTIFACTS.mkdir(exist_ok=True)
    browser = page.context.browser
    context = browser.new_context(viewport={"width": width, "height": 500})
    try:
        page = context.new_page()
        # A long model id, as a server started on a checkpoint folder may show.
        page.route(
            "**/v1/dg/info",
            lambda route: route.fulfill(
                json={"dg_stream": "0.0.0", "model": "a-rather-long-checkpoint-folder-name-v2"}
            ),
        )
        page.goto(server[0] + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('v2')")
        page.fill("#max-tokens", "8")
        page.fill("#input", "def add(a, b):")
        page.press("#input", "Enter")
        page.wait_for_function(
            "[...document.querySelectorAll('.msg.assistant')].pop().dataset.state === 'done'"
        )
        page.screenshot(path=str(ARTIFACTS / f"chat_page_{width}.png"))
        lines = page.evaluate(HEADER_LINES)
        rows = page.evaluate(HEADER_ROWS)
        shown = page.evaluate("""() => [
            '\\n\\n  def f():\\n', ' \\n\\tx', '  ', '\\n', 'abc\\n\\n', '  a'
        ].map(displayedReply)""")
    finally:
        context.close()
    assert [text for text, n in lines if n != 1] == [], lines
    assert max(rows) - min(rows) <= 4, rows  # one row
    assert shown == ["  def f():\n", "\tx", "", "", "abc\n\n", "  a"]


@pytest.fixture(scope="module")
def keyed_server(tiny_backend: Any) -> Iterator[str]:
    """The app behind an API key, as ``dg-stream serve --api-key sesame`` runs it."""
    import uvicorn

    from dg_stream.server import create_app

    port = _free_port()
    app = create_app(tiny_backend, model_name="tiny-keyed", api_key="sesame")
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=15)


LAST_STATE = "[...document.querySelectorAll('.msg.assistant')].pop().dataset.state"


def test_a_server_with_an_api_key_can_be_used_from_the_page(page: Any, keyed_server: str) -> None:
    browser = page.context.browser
    context = browser.new_context(viewport={"width": 1000, "height": 720})
    try:
        page = context.new_page()
        page.goto(keyed_server + "/")
        # The server answered 401: the page asks for the key.
        page.wait_for_function("!document.getElementById('key-field').hidden")
        assert "needs an API key" in (page.text_content("#model") or "")
        page.fill("#max-tokens", "6")
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        page.wait_for_function(f"{LAST_STATE} === 'error'")
        assert "API key" in (page.locator(".msg.assistant .note").last.text_content() or "")

        page.fill("#api-key", "sesame")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.getElementById('model').textContent.includes('keyed')")
        page.fill("#input", "hi")
        page.press("#input", "Enter")
        page.wait_for_function(f"{LAST_STATE} !== 'streaming'")
        assert page.evaluate(LAST_STATE) == "done"

        # Kept for this tab (a reload keeps it), in sessionStorage only.
        storage = page.evaluate("[{...sessionStorage}, {...localStorage}]")
        assert storage == [{"dg-stream-api-key": "sesame"}, {}]
        page.reload()
        page.wait_for_function("document.getElementById('model').textContent.includes('keyed')")
        assert page.input_value("#api-key") == "sesame"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "chat_page_api_key.png"))
    finally:
        context.close()


def test_the_page_can_ask_for_json(page: Any, server: tuple[str, PacedBackend]) -> None:
    """The JSON box sends response_format json_object: the reply is constrained to JSON."""
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny-test')")
    page.click("#new-chat")
    page.check("#json")
    page.fill("#max-tokens", "40")
    page.fill("#input", "A user record:")
    page.press("#input", "Enter")
    page.wait_for_function(f"{LAST_STATE} === 'done'")
    page.uncheck("#json")
    request = server[1].requests[-1]
    request = getattr(request, "request", request)  # admitted (its grammar compiled) first
    assert request.response_format is not None
    assert request.response_format.type == "json_object"
    text = page.locator(".msg.assistant").last.locator(".committed").text_content() or ""
    assert text.startswith("{")
