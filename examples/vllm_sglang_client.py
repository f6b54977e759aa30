"""dg_stream as the client of vLLM or SGLang serving a model with a DFlash drafter.

    # vLLM (port 8000; a release with DFlash support):
    vllm serve Qwen/Qwen3-8B --speculative-config \\
        '{"method": "dflash", "model": "z-lab/Qwen3-8B-DFlash-b16", "num_speculative_tokens": 15}'
    # or SGLang (port 30000):
    python -m sglang.launch_server --model-path Qwen/Qwen3-8B --speculative-algorithm DFLASH \\
        --speculative-draft-model-path z-lab/Qwen3-8B-DFlash-b16 --speculative-num-draft-tokens 16

    DG_STREAM_URL=http://127.0.0.1:8000 python examples/vllm_sglang_client.py

The engine drafts and verifies on its GPUs; dg_stream streams what it commits, as the same
``Chunk``s a local backend gives, with usage and finish reason at the end, and LangChain runs
on top. DG_STREAM_URL names the server (default http://127.0.0.1:8000), DG_STREAM_MODEL the
model (default: the first one ``/v1/models`` lists), DG_STREAM_MAX_NEW_TOKENS caps each reply.
Nothing here imports torch: ``RemoteBackend`` needs only httpx (LangChain: the langchain extra).
"""

from __future__ import annotations

import os

import anyio

import dg_stream


async def main() -> None:
    url = os.environ.get("DG_STREAM_URL", "http://127.0.0.1:8000")
    n = int(os.environ.get("DG_STREAM_MAX_NEW_TOKENS", "128"))
    # api="openai": vLLM and SGLang speak the OpenAI protocol (no dg_stream draft previews or
    # per-step stats over it); stream_options.include_usage is sent, so usage comes at the end.
    backend = dg_stream.RemoteBackend(
        url, os.environ.get("DG_STREAM_MODEL"), api="openai", timeout=120
    )
    async with backend:
        # 1. A completion (/v1/completions), streamed as the engine commits it.
        stream = dg_stream.generate(
            "def fibonacci(n):", backend=backend, max_new_tokens=n, temperature=0
        )
        async with stream:
            async for chunk in stream:
                print(chunk.text, end="", flush=True)
        usage = stream.usage
        print(
            f"\n[model {backend.model_name}, context {backend.context_length}, "
            f"{usage.completion_tokens if usage else '?'} tokens, finish={stream.finish_reason}]"
        )

        # 2. Chat messages go to /v1/chat/completions (the server's chat template); operators
        # work on remote streams as on local ones.
        first_line = await dg_stream.generate(
            [{"role": "user", "content": "Name three sorting algorithms, one per line."}],
            backend=backend,
            max_new_tokens=n,
        ).pipe(dg_stream.stop_at("\n"), dg_stream.collect())
        print(f"first line: {first_line.text!r} ({first_line.finish_reason})")

        # 3. LangChain over the same backend: a prompt-template chain, streamed.
        try:
            from langchain_core.prompts import ChatPromptTemplate

            from dg_stream.integrations.langchain import ChatDGStream
        except ImportError:
            print("(pip install '.[langchain]' for the LangChain part)")
            return
        model = ChatDGStream(backend=backend, max_tokens=n)
        chain = (
            ChatPromptTemplate.from_messages(
                [("system", "You are terse."), ("human", "{question}")]
            )
            | model
        )
        reply = None
        async for piece in chain.astream({"question": "What does a speculative drafter do?"}):
            print(piece.content, end="", flush=True)
            reply = piece if reply is None else reply + piece
        assert reply is not None
        tokens = reply.usage_metadata["output_tokens"] if reply.usage_metadata else "?"
        print(f"\n[langchain: {tokens} tokens, finish={reply.response_metadata['finish_reason']}]")


if __name__ == "__main__":
    anyio.run(main)
