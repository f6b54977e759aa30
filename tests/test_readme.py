"""The README's promises a new user acts on: install commands that work, honest figures."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_install_commands_work_from_a_checkout() -> None:
    """dg_stream is not on PyPI: every pip command installs the checkout, never by name."""
    commands = re.findall(r"pip install [^\n`#&]*", README)
    assert commands
    for command in commands:
        assert "dg-stream" not in command and "dg_stream" not in command, command
        assert re.search(r"(^|\s|')(-e )?\.(\[[a-z,]+\])?('|\s|$)", command), command


def test_the_quick_start_speed_line_has_its_held_out_figures_next_to_it() -> None:
    start = README.index("## Quick start")
    quick_start = README[start : README.index("\n## ", start + 1)]
    assert "favourable" in quick_start and "held-out" in quick_start
    assert "(#benchmarks)" in quick_start


def test_the_embedded_pair_is_called_a_code_model_with_a_way_to_real_chat() -> None:
    start = README.index("## Quick start")
    quick_start = README[start : README.index("\n## ", start + 1)]
    assert "small code model" in quick_start
    assert "dg-stream chat --verifier" in quick_start and "Instruct" in quick_start


def test_the_drafter_of_ones_own_decodes_as_the_verifier_does(tiny_tok: object) -> None:
    """The README's example drafter, as written, drafts through the contract and leaves the
    verifier's greedy output unchanged."""
    import anyio
    from _models import tiny_causal_lm

    import dg_stream

    start = README.index("**A drafter of your own**")
    begin = README.index("```python\n", start) + len("```python\n")
    block = README[begin : README.index("\n```", begin)]
    verifier = tiny_causal_lm("llama", len(tiny_tok))  # type: ignore[arg-type]
    code = block.replace(
        '"path/to/verifier", RepeatLast()', "verifier, RepeatLast(), tokenizer=tok"
    )
    scope: dict[str, object] = {"dg_stream": dg_stream, "verifier": verifier, "tok": tiny_tok}
    exec(code, scope)
    backend = scope["backend"]
    plain = dg_stream.LocalBackend(verifier, None, tokenizer=tiny_tok)

    async def run(on: object, **options: object) -> dg_stream.Completion:
        return await dg_stream.generate(
            [5, 6, 5, 6, 5], backend=on, max_new_tokens=20, **options
        ).collect()  # type: ignore[arg-type]

    drafted = anyio.run(lambda: run(backend, block_size=4, adaptive=False))
    assert drafted.token_ids == anyio.run(lambda: run(plain)).token_ids
    assert drafted.stats.drafted_tokens > 0
