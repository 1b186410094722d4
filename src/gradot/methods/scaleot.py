"""ScaleOT-style emulator (Yao et al., AAAI 2025): the least important middle layers are replaced by
small trained *harmonizers*, and the attention of the layers that remain is rank-reduced by
truncated SVD.

* **Importance.** The paper learns layer importance with reinforcement learning. Here it is the
  increase of the original model's language-model loss on the calibration text when that one layer
  is bypassed (its output replaced by its input): one forward pass per middle layer, no training.
  ``--importance uniform`` replaces evenly spaced layers instead (the control this estimator is
  measured against).
* **Harmonizers.** Each span of consecutive replaced layers gets one harmonizer: a decoder layer of
  the base architecture, cut down to ``harmonizer_width`` (its attention linears at that rank, its
  MLP at that many channels), initialised from the span's first layer with its output projections
  (attention out, MLP down) set to zero, so that it starts as the bypass, i.e. as dropping the span.
  It is then trained like OT's distillation (``distill.train_emulator``: hidden state at the top
  adapter's input and/or the output distribution, on public text); the remaining layers stay frozen.
  A harmonizer is an ordinary layer of the emulator: its slot records its shapes (``ranks``,
  ``channels``) and the span it stands in for (``replaces``), its tensors are saved, listed and
  checked like every other, and its parameters count in the emulator's budget.
* **Budget.** Remaining layers keep ``attn_keep`` of each attention linear's parameters; the number of
  replaced layers is the smallest that brings the middle block within ``keep``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from ..emulator import assemble
from ..errors import MethodConfigError
from ..offload import onloaded, plain_copy
from ..registry import arch_of, decoder_layers, get_module, linear_shape, set_module
from ..split import Split
from ..surgery import unique_parameter_count
from .base import Calibration, SimpleMethod, option
from .distill import TrainOptions, train_emulator
from .harmonizers import harmonizer, svd_lowrank

IMPORTANCE = ("bypass-loss", "uniform")


@dataclass(frozen=True)
class ScaleOTConfig(TrainOptions):
    attn_keep: float = option(0.5, "share of each attention linear's parameters the remaining layers keep "
                              "(truncated SVD; 1: attention untouched)")
    harmonizer_width: int | None = option(None, "a harmonizer's attention rank and MLP channels (default: "
                                          "hidden size / 16)", kind=int, minimum=1, metavar="N")
    harmonizer_lr: float = option(1e-3, "learning rate (AdamW, constant) of the harmonizers")
    importance: str = option("bypass-loss", "which layers harmonizers replace: the least important by the loss "
                             "increase when bypassed, or evenly spaced ones (uniform, the control)",
                             choices=IMPORTANCE)
    importance_batches: int = option(2, "calibration batches the bypass importance is measured on",
                                     minimum=1, metavar="N")

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.attn_keep <= 1:
            raise MethodConfigError(f"--attn-keep {self.attn_keep}: must be in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Importance: the loss increase when one middle layer is bypassed


def _bypass(module, args, kwargs, output):
    hidden = args[0] if args else kwargs["hidden_states"]
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def _lm_loss(model: nn.Module, batches) -> float:
    with torch.no_grad():
        return sum(float(model(input_ids=b, labels=b, use_cache=False).loss) for b in batches) / len(batches)


def bypass_importance(model: nn.Module, split: Split, batches) -> list[float]:
    """Per middle layer: the LM loss on ``batches`` with that layer bypassed, minus the intact loss."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    batches = [b.to(device) for b in batches]
    base = _lm_loss(model, batches)
    out = []
    for i in split.middle:
        handle = layers[i].register_forward_hook(_bypass, with_kwargs=True)
        try:
            out.append(_lm_loss(model, batches) - base)
        finally:
            handle.remove()
    return out


# ---------------------------------------------------------------------------------------------
# Layers


def reduced_layer(layer: nn.Module, arch, attn_keep: float) -> nn.Module:
    """A copy of ``layer`` whose attention linears keep ``attn_keep`` of their parameters (truncated SVD,
    only where a factorisation is smaller)."""
    new = plain_copy(layer)
    if attn_keep >= 1:
        return new
    for name in arch.attn_linears:
        module = get_module(new, name)
        out_f, in_f = linear_shape(module, arch)
        rank = max(1, math.floor(attn_keep * out_f * in_f / (out_f + in_f)))
        set_module(new, name, svd_lowrank(module, arch, rank))
    return new


def spans_of(replaced: set[int], n: int) -> list[list[int]]:
    """Maximal runs of consecutive indices in ``replaced`` (indices into the middle block)."""
    spans: list[list[int]] = []
    for i in range(n):
        if i in replaced:
            if spans and spans[-1][-1] == i - 1:
                spans[-1].append(i)
            else:
                spans.append([i])
    return spans


def evenly_spaced(n: int, m: int) -> set[int]:
    """``m`` of ``n`` indices spread evenly (the centres of ``m`` equal parts)."""
    return {min(n - 1, int((j + 0.5) * n / m)) for j in range(m)}


def choose_replaced(pick, kept_cost: list[int], harm_cost: int, budget: float) -> set[int]:
    """The fewest layers (``pick(m)``: which m) whose replacement brings the middle within ``budget``."""
    n = len(kept_cost)
    for n_rep in range(n + 1):
        rep = pick(n_rep)
        cost = sum(c for i, c in enumerate(kept_cost) if i not in rep) + harm_cost * len(spans_of(rep, n))
        if cost <= budget:
            return rep
    return set(range(n))


# ---------------------------------------------------------------------------------------------
# The method


def scaleot_emulator(model: nn.Module, split: Split, config: ScaleOTConfig, calibration: Calibration | None):
    if calibration is None:
        raise MethodConfigError("scaleot needs calibration text")
    arch = arch_of(model)
    layers = decoder_layers(model)
    middle = split.middle
    n = len(middle)
    width = config.harmonizer_width or max(1, model.config.hidden_size // 16)
    start = time.perf_counter()
    if config.importance == "bypass-loss":
        scores = bypass_importance(model, split, calibration.batches[:config.importance_batches])
        order = sorted(range(n), key=lambda i: (scores[i], i))  # least important first

        def pick(m):
            return set(order[:m])
    else:
        scores = None

        def pick(m):
            return evenly_spaced(n, m) if m else set()
    with onloaded(*[layers[i] for i in middle]):
        reduced = [reduced_layer(layers[i], arch, config.attn_keep) for i in middle]
        probe = harmonizer(layers[middle[0]], arch, width)
        original = unique_parameter_count([layers[i] for i in middle])
        replaced = choose_replaced(pick, [unique_parameter_count([m]) for m in reduced],
                                   unique_parameter_count([probe]), config.keep * original)
        spans = spans_of(replaced, n)
        firsts = {span[0]: span for span in spans}
        built, sources, replaces = [], [], {}
        for i in range(n):
            if i in firsts:
                replaces[len(built)] = [middle[j] for j in firsts[i]]
                built.append(harmonizer(layers[middle[i]], arch, width))
            elif i not in replaced:
                built.append(reduced[i])
            else:
                continue
            sources.append(middle[i])
    select_seconds = time.perf_counter() - start
    emulator = assemble(model, split, built, sources, [None] * len(built), method="scaleot", keep=config.keep,
                        replaces=replaces)
    emu_layers = decoder_layers(emulator.model)
    positions = [split.k + i for i in replaces]
    params = [p for pos in positions for p in emu_layers[pos].parameters()]
    harmonizers = [{"position": pos, "replaces": replaces[pos - split.k],
                    "params": unique_parameter_count([emu_layers[pos]])} for pos in positions]
    run = (train_emulator(model, emulator, split, params, calibration, config, config.harmonizer_lr, "harmonizers")
           if params else {"steps": 0, "note": "no layer replaced: nothing to train"})
    emulator.manifest["settings"] = {
        "importance": {"estimator": config.importance,
                       "bypass_loss_increase": None if scores is None else
                       {str(middle[i]): round(s, 6) for i, s in enumerate(scores)},
                       "batches": config.importance_batches if scores is not None else 0},
        "attn_keep": config.attn_keep,
        "harmonizer": {"architecture": f"{model.config.model_type} decoder layer: attention linears at rank "
                                       f"{width}, MLP at {width} channels; output projections zero-initialised",
                       "width": width},
        "harmonizers": harmonizers,
        "select_seconds": round(select_seconds, 1),
        "training": run,
    }
    return emulator


METHOD = SimpleMethod("scaleot", "ScaleOT: least important middle layers replaced by trained harmonizers, attention "
                      "rank-reduced", ScaleOTConfig, True, scaleot_emulator)

__all__ = ["METHOD", "ScaleOTConfig", "bypass_importance", "choose_replaced", "evenly_spaced", "harmonizer", "reduced_layer",
           "scaleot_emulator", "spans_of"]
