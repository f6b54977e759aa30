"""``dg-stream chat`` reads its prompt with line editing where Python has readline: in a real
terminal (a pseudo-terminal here), the up arrow brings the previous line back."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time

import pytest

pytest.importorskip("readline")
pty = pytest.importorskip("pty")

SCRIPT = """
import sys
from dg_stream.cli import ChatLoop
loop = ChatLoop(None, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr)
assert loop.interactive
for _ in range(2):
    print("got:" + repr(loop.read()), flush=True)
"""


def _read_until(fd: int, pattern: str, seen: bytearray, deadline: float) -> str:
    while not re.search(pattern, seen.decode(errors="replace")):
        left = deadline - time.monotonic()
        assert left > 0, f"waited for {pattern!r}, got {bytes(seen)!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            seen.extend(chunk)
    return seen.decode(errors="replace")


def test_the_up_arrow_recalls_the_previous_line() -> None:
    main, child = pty.openpty()
    env = {**os.environ, "TERM": "xterm", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT], stdin=child, stdout=child, stderr=child, env=env
    )
    os.close(child)
    deadline = time.monotonic() + 60
    seen = bytearray()
    try:
        _read_until(main, r"> ", seen, deadline)
        os.write(main, b"def add(a, b):\r")
        _read_until(main, r"got:.*\n(.|\n)*> ", seen, deadline)
        os.write(main, b"\x1b[A\r")  # up arrow, Enter
        text = _read_until(main, r"got:(.|\n)*got:[^\n]*\n", seen, deadline)
        assert proc.wait(timeout=30) == 0, text
    finally:
        proc.kill()
        os.close(main)
    assert re.findall(r"got:('[^'\n]*')", text) == ["'def add(a, b):'", "'def add(a, b):'"], text
