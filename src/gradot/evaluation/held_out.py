"""A model's loss on the data owner's own held-out file: mean answer-token negative log-likelihood
and perplexity, on records encoded exactly as fine-tuning encodes them (``finetune --data``'s
formats; the loss only on each pair's answer, on every token of a plain text)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm


@torch.no_grad()
def held_out_loss(model: nn.Module, tokenizer, records: Sequence, batch_size: int = 8, max_length: int = 256,
                  progress: bool = True) -> dict[str, float]:
    """``{"answer_loss", "answer_loss_stderr", "perplexity", "tokens", "n"}`` over ``records``
    ((prompt, answer) pairs or texts, as ``finetune_adapter`` takes them).

    ``answer_loss`` is the mean over every answer token (so ``perplexity`` = exp of it, the usual
    token-level perplexity); its standard error is that of the per-example means (examples are the
    independent units), ``n`` the number of examples (text windows for plain text).
    """
    from ..finetune import CausalLMCollator, FinetuneDataset, pad_token_id

    dataset = FinetuneDataset(tokenizer, records, max_length)
    collate = CausalLMCollator(pad_token_id(tokenizer))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, per_example = 0.0, 0, []
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="held-out loss", leave=False, disable=not progress):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           use_cache=False).logits[:, :-1].float()
            labels = batch["labels"][:, 1:].to(device)  # position t predicts token t + 1
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            counted = labels != -100
            sums, counts = (nll * counted).sum(1), counted.sum(1)
            per_example += (sums / counts.clamp(min=1)).tolist()
            total += float(sums.sum())
            tokens += int(counts.sum())
    finally:
        model.train(was_training)
    mean = total / tokens
    n = len(per_example)
    example_mean = sum(per_example) / n
    spread = math.sqrt(sum((x - example_mean) ** 2 for x in per_example) / (n - 1) / n) if n > 1 else float("nan")
    return {"answer_loss": mean, "answer_loss_stderr": spread, "perplexity": math.exp(mean), "tokens": tokens, "n": n}
