"""Tiny models and a tiny tokenizer for tests: random-init transformers configs, built offline."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

TEXT = (
    "def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n"
    "        self.items.append(x)\n\nprint('héllo wörld ✓ 日本語 🙂')\n"
) * 4


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_dir(root: str) -> Path:
    from dg_stream.train.tokenizer import train_tokenizer

    return train_tokenizer([TEXT], Path(root) / "tiny-tokenizer", vocab_size=300)


def tiny_tokenizer(root: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir(root))


ARCHITECTURES = ["llama", "qwen2", "gpt2", "gpt_neox", "mistral", "phi"]


def tiny_causal_lm(arch: str, vocab_size: int, seed: int = 0, eos_token_id: int = 0) -> Any:
    """A random-init causal LM of the given family with a sharp (low-entropy) output layer."""
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab_size, eos_token_id=eos_token_id, bos_token_id=eos_token_id, pad_token_id=1
    )
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=512, **common)
    elif arch == "gpt_neox":
        config = tf.GPTNeoXConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            **common,
        )
    elif arch == "phi":
        config = tf.PhiConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            **common,
        )
    else:
        cls = {
            "llama": tf.LlamaConfig,
            "qwen2": tf.Qwen2Config,
            "qwen3": tf.Qwen3Config,
            "mistral": tf.MistralConfig,
        }[arch]
        extra: dict[str, Any] = {"sliding_window": 24} if arch == "mistral" else {}
        config = cls(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
            **extra,
            **common,
        )
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # larger logits: fewer near-ties, more varied greedy text
        model.get_output_embeddings().weight.mul_(4.0)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = 1
    return model.eval()


def tiny_masked_lm(vocab_size: int, mask_token_id: int, seed: int = 1, positions: int = 64) -> Any:
    import transformers as tf

    config = tf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        mask_token_id=mask_token_id,
    )
    torch.manual_seed(seed)
    return tf.BertForMaskedLM(config).eval()


def tiny_feature_drafter(
    vocab_size: int,
    mask_token_id: int,
    verifier: Any,
    layers: tuple[int, ...] = (1, 2),
    seed: int = 5,
    window: int = 16,
) -> Any:
    """A random feature-conditioned diffusion drafter for ``verifier`` (DFlash-style)."""
    from dg_stream._drafters import DiffusionDrafter

    model = tiny_masked_lm(vocab_size, mask_token_id, seed=seed)
    model.config.dg_stream_feature_layers = list(layers)
    hidden = int(verifier.config.hidden_size)
    g = torch.Generator().manual_seed(seed)
    # Large enough that the features visibly move the drafter's predictions.
    projection = torch.randn(model.config.hidden_size, len(layers) * hidden, generator=g)
    return DiffusionDrafter(
        model, mask_token_id=mask_token_id, window=window, feature_projection=projection
    )


def tiny_dflash(
    verifier: Any,
    mask_token_id: int,
    target_layers: tuple[int, ...] = (0, 1),
    block_size: int = 17,
    layers: int = 2,
    seed: int = 3,
    scale: float = 1.0,
) -> Any:
    """A random-init DFlash-format drafter network for ``verifier`` (its width and heads)."""
    from dg_stream._drafters.dflash_model import DFlashModel, dflash_config

    config = dflash_config(
        verifier.config,
        layers=layers,
        mask_token_id=mask_token_id,
        block_size=block_size,
        target_layer_ids=list(target_layers),
    )
    torch.manual_seed(seed)
    model = DFlashModel(config)
    with torch.no_grad():  # Linear's default init; scale it to move drafts more or less
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(scale)
    return model.eval()
