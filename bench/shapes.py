"""Random-initialised Llama-shaped models of real sizes, shared by the benchmarks (no download).

Speed and memory depend on shapes, not on trained weights, so these stand in for real checkpoints
where none can be loaded (a GPU machine that reaches no hub, sizes beyond the embedded model).
"""

from __future__ import annotations

import torch

SIZES = {
    # name: LlamaConfig fields (vocabulary of SmolLM2 unless stated)
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=8, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=49152),
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                 num_key_value_heads=5, vocab_size=49152),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),  # Llama-3.2-1B
}


def random_llama(size: str, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A random Llama-shaped causal LM of one of ``SIZES``, initialised directly on ``device``
    (a 1B model takes minutes to initialise on a CPU, seconds on a GPU)."""
    from transformers import LlamaConfig

    from gradot.modeling import random_model

    if size not in SIZES:
        raise SystemExit(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True)
    with torch.device(device):
        return random_model(cfg, seed=seed, dtype=dtype)


def load_bench_model(name: str, tokenizer: str | None = None, dtype: torch.dtype = torch.float32,
                     device: str = "cpu"):
    """``(model, tokenizer)`` for a benchmark's ``--model``: ``random:<size>`` (one of ``SIZES``, with
    ``tokenizer``'s folder or else the default model's tokenizer) or anything ``load_model`` takes."""
    from gradot.modeling import load_model

    if not name.startswith("random:"):
        return load_model(name, dtype=dtype, device=device)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else load_model("default")[1]
    return random_llama(name.split(":", 1)[1], dtype=dtype, device=device).eval(), tok
