"""The official ``openai`` client against ``dg-stream serve`` (OpenAI-compatible endpoints).

    dg-stream serve --port 8000 &
    python examples/openai_client.py

DG_STREAM_URL names the server (default http://127.0.0.1:8000).
"""

from __future__ import annotations

import os

from openai import OpenAI


def main() -> None:
    url = os.environ.get("DG_STREAM_URL", "http://127.0.0.1:8000")
    n = int(os.environ.get("DG_STREAM_MAX_NEW_TOKENS", "64"))
    # dg-stream serve needs no key unless started with one; the client insists on a value.
    client = OpenAI(base_url=f"{url}/v1", api_key=os.environ.get("DG_STREAM_API_KEY", "unused"))
    model = client.models.list().data[0].id
    print(f"model: {model}")

    stream = client.chat.completions.create(
        model=model,
        max_tokens=n,
        temperature=0,
        stream=True,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Write a haiku about speculative decoding."},
        ],
    )
    for event in stream:
        if event.choices and event.choices[0].delta.content:
            print(event.choices[0].delta.content, end="", flush=True)
    print()

    completion = client.completions.create(model=model, prompt="def add(a, b):", max_tokens=n)
    print(
        f"completion ({completion.usage.completion_tokens if completion.usage else '?'} "
        f"tokens): {completion.choices[0].text!r}"
    )


if __name__ == "__main__":
    main()
