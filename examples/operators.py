"""Stream operators: re-chunk, stop early, time-limit, fan out, transform, collect.

    python examples/operators.py

DG_STREAM_VERIFIER / DG_STREAM_DRAFTER / DG_STREAM_MAX_NEW_TOKENS as in quickstart.py.
"""

from __future__ import annotations

import os

import anyio

import dg_stream
from dg_stream import by_lines, by_words, collect, map_text, stop_at, tee, until, with_timeout


def local_backend() -> dg_stream.LocalBackend:
    verifier = os.environ.get("DG_STREAM_VERIFIER")
    if verifier:
        return dg_stream.LocalBackend(verifier, os.environ.get("DG_STREAM_DRAFTER"))
    return dg_stream.LocalBackend.default()


async def main() -> None:
    backend = local_backend()
    n = int(os.environ.get("DG_STREAM_MAX_NEW_TOKENS", "80"))
    prompt = "class Stack:\n"

    # 1. Whole lines only, ending at the first blank line; stop_at ends the model work too.
    print("-- lines until a blank line")
    async with dg_stream.generate(prompt, backend=backend, max_new_tokens=n).pipe(
        stop_at("\n\n"), by_lines()
    ) as lines:
        async for line in lines:
            print(f"| {line.text}", end="" if line.text.endswith("\n") else "\n")
    print(f"(finish: {lines.finish_reason})")

    # 2. Word by word, with time limits that raise APITimeoutError instead of hanging.
    print("-- words, with time limits")
    words = dg_stream.generate(prompt, backend=backend, max_new_tokens=n).pipe(
        with_timeout(first_chunk=60, idle=30, total=300), by_words()
    )
    async for word in words:
        print(repr(word.text), end=" ")
    print()

    # 3. At most three lines, upper-cased, collected into one Completion.
    print("-- until three lines, upper-cased")
    completion = await dg_stream.generate(prompt, backend=backend, max_new_tokens=n).pipe(
        until(lambda text: text.count("\n") >= 3), map_text(str.upper), collect()
    )
    print(completion.text)
    print(f"(finish: {completion.finish_reason}, stats: {completion.stats})")

    # 4. One generation, two consumers: a printer and a counter, running concurrently.
    print("-- tee: one generation, two consumers")
    printer, counter = dg_stream.generate(prompt, backend=backend, max_new_tokens=n).pipe(tee(2))
    count = 0

    async def show() -> None:
        async with printer:
            async for chunk in printer:
                print(chunk.text, end="", flush=True)

    async def tally() -> None:
        nonlocal count
        async with counter:
            async for chunk in counter:
                count += len(chunk.token_ids)

    async with anyio.create_task_group() as tg:
        tg.start_soon(show)
        tg.start_soon(tally)
    print(f"\n(the counter saw {count} tokens; the printer saw {len(printer.token_ids)})")


if __name__ == "__main__":
    anyio.run(main)
