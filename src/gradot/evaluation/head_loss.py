"""Causal-LM loss with the LM head applied only where there is a label.

A causal LM's forward applies its head (hidden × vocabulary) at every position, and the stock loss
upcasts the whole ``batch × length × vocab`` logits to float32, although fine-tuning on
(prompt, answer) pairs only needs the answer positions. On the default model the head is a third of
an emulator step's FLOPs and its logits dominate activation memory (docs/speed.md).

Here the model runs as usual, but a forward pre-hook on its output embedding takes the final hidden
states and hands the head an empty slice; the loss is then computed from the hidden states at the
labelled positions only (the causal shift: hidden state ``t`` predicts label ``t + 1``), in chunks
of rows whose logits, softmax and gradients are computed together, so the full logits never exist,
not even for plain text where every token is labelled. The model's own ``forward`` still runs, so
PEFT (LoRA) and DDP (``accelerate launch``) wrappers work unchanged.

The loss equals ``transformers``' ``ForCausalLMLoss`` (float32 cross entropy, summed and divided by
``num_items_in_batch`` when the Trainer gives it, else the mean) to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CHUNK_ELEMENTS", "HeadAtLabels", "SkipHead", "head_at_labels_loss", "linear_cross_entropy"]

IGNORE = -100
#: Logit elements per chunk (float32: 32 MiB); e.g. 170 rows for a 49k vocabulary.
CHUNK_ELEMENTS = 1 << 23


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i @ W.T, y_i)`` computed chunk by chunk, gradients included.

    The gradients are formed in the forward (one chunk of logits at a time) and kept, so the
    backward is a scaling: no chunk of logits is stored or recomputed.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        device = hidden.device.type
        with torch.autocast(device, enabled=False):  # dtypes are chosen explicitly below
            w = weight.to(compute_dtype)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for start in range(0, hidden.shape[0], chunk_rows):
                h = hidden[start:start + chunk_rows].to(compute_dtype)
                y = targets[start:start + chunk_rows]
                logits = (h @ w.T).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, y[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    # d CE / d logits = softmax - one_hot(y), computed in place on the chunk
                    probs = logits.sub_(lse[:, None]).exp_()
                    probs[torch.arange(len(y), device=y.device), y] -= 1
                    g = probs.to(compute_dtype)
                    if need_h:
                        grad_h[start:start + chunk_rows] = (g @ w).to(hidden.dtype)
                    if need_w:
                        grad_w += (g.T @ h).float()
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_out if grad_h is not None else None,
                grad_w * grad_out if grad_w is not None else None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Summed cross entropy of ``hidden @ weight.T`` (rows × vocab) against ``targets``, in float32,
    never holding more than ``chunk_rows`` rows of logits. Under autocast the matmuls run in the
    autocast dtype, as the head's ``nn.Linear`` would."""
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, dtype)


def head_at_labels_loss(hidden: torch.Tensor, labels: torch.Tensor, head: nn.Module,
                        num_items_in_batch: torch.Tensor | int | None = None,
                        chunk_rows: int | None = None) -> torch.Tensor:
    """The causal-LM loss from the final hidden states ``[batch, length, hidden]`` and ``labels``
    ``[batch, length]`` (-100: no loss), the head applied only at the labelled positions."""
    if getattr(head, "bias", None) is not None:
        raise ValueError("head_at_labels_loss: an LM head with a bias is not supported")
    targets = labels[:, 1:].to(hidden.device)
    keep = targets != IGNORE
    rows = hidden[:, :-1][keep]  # hidden state t predicts label t + 1
    total = linear_cross_entropy(rows, head.weight, targets[keep], chunk_rows)
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class SkipHead:
    """While entered, a forward pre-hook on ``head`` keeps the final hidden states (``self.hidden``)
    and passes an empty slice on, so the model's head computes nothing and it returns logits of
    length 0. Reusable; each forward replaces ``hidden``."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.hidden: torch.Tensor | None = None
        self._handle = None

    def _pre_hook(self, module, args):
        (hidden,) = args
        self.hidden = hidden
        return (hidden[..., :0, :],)

    def __enter__(self):
        self._handle = self.head.register_forward_pre_hook(self._pre_hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self.hidden = None


class HeadAtLabels(SkipHead):
    """:class:`SkipHead` for training: ``loss(labels)`` after each forward is the causal-LM loss
    with the head applied only at the labelled positions."""

    def __init__(self, head: nn.Module, chunk_rows: int | None = None):
        super().__init__(head)
        self.chunk_rows = chunk_rows

    def loss(self, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        if self.hidden is None:
            raise RuntimeError("HeadAtLabels.loss: the model's head was not called since the last loss")
        hidden, self.hidden = self.hidden, None
        return head_at_labels_loss(hidden, labels, self.head, num_items_in_batch, self.chunk_rows)
