"""Fine-tuning data: records (prompt/continuation pairs or plain text) tokenized as
lm-evaluation-harness scores them, the dataset and the padding collator."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..token_cap import check_token_count


def encode_pair(tokenizer, prompt: str, continuation: str, what: str = "a training example") -> tuple[list[int], list[int]]:
    """``(prompt_ids, continuation_ids)`` as lm-evaluation-harness encodes a causal LM request.

    Mirrors ``lm_eval.api.model.TemplateLM._encode_pair`` with the harness's default special
    tokens: trailing whitespace of the prompt moves to the continuation; the continuation's ids are
    ``encode(prompt + continuation)`` minus the first ``len(encode(prompt))`` ids. An empty prompt
    becomes the model's prefix token (BOS, else EOS), as in the harness.
    """
    if not prompt:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("an empty prompt needs a tokenizer with a BOS or EOS token")
        return [prefix], encode(tokenizer, continuation, what, add_special_tokens=False)
    n_spaces = len(prompt) - len(prompt.rstrip())
    if n_spaces:
        continuation = prompt[-n_spaces:] + continuation
        prompt = prompt[:-n_spaces]
    whole = encode(tokenizer, prompt + continuation, what)
    context = encode(tokenizer, prompt, what)
    return context, whole[len(context):]


def encode(tokenizer, text: str, what: str = "a training example", **kwargs) -> list[int]:
    """``text``'s token ids, under the cap on tokens per text (``check_token_count``)."""
    ids = tokenizer(text, **kwargs)["input_ids"]
    check_token_count(len(ids), text, what)
    return ids


def _is_pair(record: Any) -> bool:
    return isinstance(record, (tuple, list)) and len(record) == 2 and all(isinstance(x, str) for x in record)


class FinetuneDataset(torch.utils.data.Dataset):
    """Tokenized training examples: ``{"input_ids": [...], "labels": [...]}`` per item.

    ``labels`` is -100 wherever no loss is wanted (the prompt of a pair). The model shifts labels
    itself, so ``labels[i]`` is the target predicted at position ``i - 1``.
    """

    def __init__(self, tokenizer, records: Sequence, max_length: int = 256):
        if isinstance(records, (str, bytes)):
            raise ValueError("records: expected a list of (prompt, continuation) pairs or texts, got one string")
        records = list(records)
        if not records:
            raise ValueError("records: expected a non-empty list of (prompt, continuation) pairs or texts")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.max_length = max_length
        self.examples: list[tuple[list[int], list[int]]] = []
        self.kinds = set()
        for i, record in enumerate(records):
            if _is_pair(record):
                prompt, continuation = record
                ctx, cont = encode_pair(tokenizer, prompt, continuation, f"record {i}")
                if not cont:
                    raise ValueError(f"record {i}: continuation {continuation!r} encodes to no tokens")
                ids = (ctx + cont)[-max_length:]
                labels = ([-100] * len(ctx) + cont)[-max_length:]
                self.examples.append((ids, labels))
                self.kinds.add("pairs")
            elif isinstance(record, str):
                ids = encode(tokenizer, record, f"record {i}")
                if len(ids) < 2:
                    raise ValueError(f"record {i}: text {record[:40]!r} has fewer than 2 tokens (nothing to predict)")
                for start in range(0, len(ids), max_length):
                    window = ids[start:start + max_length]
                    if len(window) >= 2:  # a lone trailing token has no target inside its window
                        self.examples.append((window, list(window)))
                self.kinds.add("text")
            else:
                raise ValueError(
                    f"record {i}: expected a (prompt, continuation) pair of strings or a string, got {type(record).__name__}"
                )

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids, labels = self.examples[i]
        return {"input_ids": ids, "labels": labels}

    @property
    def loss_tokens(self) -> int:
        """Tokens that carry loss (the first position of a sequence never does: nothing precedes it)."""
        return sum(sum(1 for t in labels[1:] if t != -100) for _, labels in self.examples)


@dataclass
class CausalLMCollator:
    """Right-pads a batch: ``input_ids`` with ``pad_token_id``, ``labels`` with -100, plus ``attention_mask``."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = math.ceil(length / self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(features)
        input_ids = torch.full((n, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, length), -100, dtype=torch.long)
        mask = torch.zeros((n, length), dtype=torch.long)
        for row, f in enumerate(features):
            k = len(f["input_ids"])
            input_ids[row, :k] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[row, :k] = torch.tensor(f["labels"], dtype=torch.long)
            mask[row, :k] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else EOS, else 0 (padded positions are masked and carry no loss)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def task_records(examples) -> list[tuple[str, str]]:
    """``(prompt, gold continuation)`` pairs from ``gradot.evaluation.tasks`` examples (``load_task``)."""
    return [(e.prompt, e.continuation()) for e in examples]
