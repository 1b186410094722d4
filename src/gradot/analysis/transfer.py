"""How much of the fine-tuning gain an emulator-trained adapter carries into the full model.

Two measurements of the same idea, transfer = (gain of the plugged adapter) / (gain of the same
adapter layers trained directly on the original with the same recipe, "Adapter FT"):

* on accuracy (the scoreboard): ``(Plug-in − Full ZS) / (Adapter FT − Full ZS)``;
* on loss (the cheap bench): the drop of the *original* model's answer-token loss on held-back rows
  achieved by the plugged adapter over the drop achieved by direct training, paired per row.

Both come with a delta-method standard error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def answer_losses(model: nn.Module, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int = 8,
                  max_length: int = 256, desc: str = "held-out loss") -> list[float]:
    """Mean answer-token negative log-likelihood of each (prompt, continuation) pair, encoded
    exactly as for fine-tuning (loss on the continuation only). The LM head runs only at the answer
    positions (``SkipHead``): the prompt's logits are never formed."""
    from ..evaluation.head_loss import SkipHead
    from .proxy import encode_pairs

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    out: list[float] = []
    try:
        with SkipHead(head) as skip:
            for start in tqdm(range(0, len(pairs), batch_size), desc=desc, leave=False):
                batch = encode_pairs(tokenizer, pairs[start:start + batch_size], max_length=max_length)
                batch = {k: v.to(device) for k, v in batch.items()}
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                labels = batch["labels"][:, 1:]
                keep = labels != -100
                # hidden t predicts label t + 1; the head by hand (calling it would hit the hook)
                logits = nn.functional.linear(skip.hidden[:, :-1][keep], head.weight, head.bias).float()
                nll = nn.functional.cross_entropy(logits, labels[keep], reduction="none")
                rows = keep.nonzero()[:, 0]
                sums = torch.zeros(len(labels), dtype=torch.float32, device=device).index_add_(0, rows, nll)
                out.extend((sums / keep.sum(1).clamp(min=1)).tolist())
    finally:
        model.train(was_training)
    return out


def ratio_of_means(num: Sequence[float], den: Sequence[float]) -> tuple[float, float]:
    """mean(num) / mean(den) for paired samples, with its delta-method standard error."""
    n = len(num)
    if n != len(den) or n < 2:
        raise ValueError(f"need two paired samples of equal length >= 2 (got {n} and {len(den)})")
    ma, mb = sum(num) / n, sum(den) / n
    if mb == 0:
        return float("nan"), float("nan")
    r = ma / mb
    va = sum((a - ma) ** 2 for a in num) / (n - 1)
    vb = sum((b - mb) ** 2 for b in den) / (n - 1)
    cov = sum((a - ma) * (b - mb) for a, b in zip(num, den)) / (n - 1)
    var = (va - 2 * r * cov + r * r * vb) / (n * mb * mb)
    return r, math.sqrt(max(var, 0.0))


def loss_transfer(base: Sequence[float], plugged: Sequence[float], direct: Sequence[float]) -> tuple[float, float]:
    """Per-row losses of the original model before any training (``base``), with the plugged
    emulator-trained adapter, and with the directly trained adapter: (ratio of loss drops, stderr)."""
    return ratio_of_means([b - p for b, p in zip(base, plugged)], [b - d for b, d in zip(base, direct)])


def accuracy_transfer(plugin: tuple[float, float], full_zs: tuple[float, float],
                      adapter_ft: tuple[float, float]) -> tuple[float, float]:
    """(Plug-in − Full ZS) / (Adapter FT − Full ZS) from (value, stderr) triples.

    The standard error treats the three scores as independent; they are measured on the same
    questions and positively correlated, so the true error is smaller: this one is conservative.
    """
    (p, sp), (z, sz), (a, sa) = plugin, full_zs, adapter_ft
    gain = a - z
    if gain == 0:
        return float("nan"), float("nan")
    r = (p - z) / gain
    var = (sp ** 2 + (r * sa) ** 2 + ((r - 1) * sz) ** 2) / gain ** 2
    return r, math.sqrt(var)
