"""Which parameters require gradients, for the duration of a block: the one place that saves and
restores ``requires_grad`` flags (statistics passes, gradient probes, fine-tuning)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def requiring_grad(model: nn.Module, trainable: Iterable[nn.Parameter] | None) -> Iterator[None]:
    """Exactly ``trainable`` require gradients inside the block (every parameter frozen for an empty
    list; the flags left as they are for None); every flag is restored afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        if trainable is not None:
            keep = {id(p) for p in trainable}
            for p in model.parameters():
                p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
