"""Cheap proxies for an emulator's two qualities, measured without fine-tuning.

* utility: cosine similarity between the adapter's gradient on the emulator and on the original
  model, per batch of task data (paired: the same batches for every method);
* privacy: perplexity of the emulator on held-out text (higher = the emulator alone is worse).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..freezing import requiring_grad
from ..registry import decoder_layers


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int = 256) -> dict[str, torch.Tensor]:
    """One padded batch of (prompt, continuation) pairs, tokenized exactly as for fine-tuning
    (the harness's encoding; labels only on the continuation)."""
    from ..finetune import CausalLMCollator, FinetuneDataset, pad_token_id

    dataset = FinetuneDataset(tokenizer, pairs, max_length)
    return CausalLMCollator(pad_token_id(tokenizer))([dataset[i] for i in range(len(dataset))])


def _adapter_params(model: nn.Module, positions: Sequence[int]) -> list[nn.Parameter]:
    layers = decoder_layers(model)
    return [p for i in positions for p in layers[i].parameters()]


def adapter_gradients(model: nn.Module, positions: Sequence[int], batches, desc: str = "adapter gradients") -> list[torch.Tensor]:
    """Flattened gradient of the loss w.r.t. the adapter layers' parameters, one vector per batch."""
    params = _adapter_params(model, positions)
    was_training = model.training
    model.eval()
    device = params[0].device
    out = []
    try:
        with requiring_grad(model, params):
            for batch in tqdm(batches, desc=desc, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                loss = model(**batch, use_cache=False).loss
                grads = torch.autograd.grad(loss, params)
                out.append(torch.cat([g.reshape(-1).float().cpu() for g in grads]))
    finally:
        model.train(was_training)
    return out


def cosines(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> list[float]:
    return [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(reference, other)]


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Token-level perplexity over fixed-length chunks (every token predicted from its prefix)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids in tqdm(batches, desc="perplexity", leave=False):
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)
