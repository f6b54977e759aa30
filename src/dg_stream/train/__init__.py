"""Training for the embedded default pair, and diffusion drafters for any causal LM.

Entry points are the ``dg-stream train tokenizer|verifier|drafter`` commands; each module
here is one of them, plus the shared corpus and loop helpers.
"""
