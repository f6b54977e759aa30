"""Overhead of the remote path: tokens/s through ``dg-stream serve`` vs the same model in process.

    python benchmarks/remote_overhead.py                       # tiny random-init test models
    python benchmarks/remote_overhead.py --verifier V --drafter D --max-new-tokens 128

The server is the real CLI (``dg-stream serve``) in its own process; this process runs the
local baseline with the same checkpoints and settings, then the same prompts through
``RemoteBackend`` (native protocol and OpenAI protocol), sequentially and with 8 concurrent
streams. Greedy decoding, so every path must produce the same text (checked). Reports tokens/s
and the remote/local ratio. Without --verifier it saves the tiny test models (tests/_models.py)
to a temporary folder first: their steps take milliseconds, so HTTP costs weigh as much as they
ever can; with real models the ratio moves towards 1.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import httpx

import dg_stream

PROMPTS = [
    "def add(a, b):",
    "class Stack:",
    "print('hello')",
    "def push(self, x):",
    "import os\n",
    "for i in range(10):",
    "return a +",
    "# a comment\n",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_pair(root: Path) -> tuple[Path, Path]:
    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    from _models import tiny_causal_lm, tiny_masked_lm, tiny_tokenizer
    from _saved_models import save_tiny_pair

    tok = tiny_tokenizer(str(root))
    return save_tiny_pair(
        root, tok, tiny_causal_lm("llama", len(tok)), tiny_masked_lm(len(tok), tok.mask_token_id)
    )


async def run(backend: Any, n: int, rounds: int, concurrency: int) -> tuple[float, list[str]]:
    """(tokens per second, texts): ``rounds`` passes over the prompts, ``concurrency`` at once."""
    texts: list[str] = [""] * len(PROMPTS)
    tokens = 0
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        nonlocal tokens
        async with limiter:
            done = await dg_stream.generate(PROMPTS[i], backend=backend, max_new_tokens=n).collect()
        texts[i] = done.text
        tokens += done.usage.completion_tokens if done.usage else 0

    started = time.perf_counter()
    for _ in range(rounds):
        async with anyio.create_task_group() as tg:
            for i in range(len(PROMPTS)):
                tg.start_soon(one, i)
    return tokens / (time.perf_counter() - started), texts


async def measure(args: argparse.Namespace, verifier: Path, drafter: Path) -> None:
    local = dg_stream.LocalBackend(
        str(verifier), str(drafter), block_size=args.block_size, device="cpu"
    )
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dg_stream.cli",
            "serve",
            "--verifier",
            str(verifier),
            "--drafter",
            str(drafter),
            "--block-size",
            str(args.block_size),
            "--device",
            "cpu",
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        await run(local, 4, 1, 1)  # warm-up, both sides
        async with (
            dg_stream.RemoteBackend(url, api="dg") as native,
            dg_stream.RemoteBackend(url, api="openai") as compatible,
        ):
            await run(native, 4, 1, 1)
            await run(compatible, 4, 1, 1)
            for concurrency in (1, 8):
                base, expected = await run(local, args.max_new_tokens, args.rounds, concurrency)
                print(f"concurrency {concurrency}: local {base:8.1f} tok/s")
                for name, backend in (("native", native), ("openai", compatible)):
                    rate, texts = await run(backend, args.max_new_tokens, args.rounds, concurrency)
                    same = "same text" if texts == expected else "TEXT DIFFERS"
                    print(
                        f"concurrency {concurrency}: {name:6} {rate:8.1f} tok/s  "
                        f"ratio {rate / base:.3f}  ({same})"
                    )
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--verifier")
    parser.add_argument("--drafter")
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.verifier:
            verifier, drafter = Path(args.verifier), Path(args.drafter)
        else:
            verifier, drafter = tiny_pair(Path(tmp))
        anyio.run(measure, args, verifier, drafter)


if __name__ == "__main__":
    main()
