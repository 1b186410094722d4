"""ScaleOT's harmonizers as layers: building one (``harmonizer``) and the bounds of a harmonizer
slot in a shipped manifest (no wider than the layer it replaces, a span that tiles the middle with
the other slots), registered as the "harmonizer" slot kind. Kept apart from ``scaleot`` (which
trains them) so that loading an emulator needs no training code."""

from __future__ import annotations

import torch
from torch import nn

from ..offload import plain_copy
from ..registry import get_module, linear_shape, set_module, weight_out_in
from ..slot_kinds import Problem, SlotView, neighbours, register_slot_kind
from ..surgery import LowRankLinear, prune_mlp_channels, shape_problem, to_lowrank


def svd_lowrank(module: nn.Module, arch, rank: int) -> LowRankLinear:
    """``module`` as its truncated SVD at ``rank`` (capped at the number of singular values)."""
    w = weight_out_in(module, arch).float()
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    return to_lowrank(module, arch, U, S, Vh, torch.arange(min(rank, S.numel())))


def harmonizer(layer: nn.Module, arch, width: int) -> nn.Module:
    """A small decoder layer (attention at rank ``width``, MLP at ``width`` channels) from ``layer``,
    whose output projections are zero: it computes the identity until trained."""
    new = plain_copy(layer)
    for name in arch.attn_linears:
        module = get_module(new, name)
        set_module(new, name, svd_lowrank(module, arch, min(width, *linear_shape(module, arch))))
    mlp_out = get_module(new, arch.mlp_out)
    channels = linear_shape(mlp_out, arch)[1]
    w = weight_out_in(mlp_out, arch)
    strongest = w.float().norm(dim=0).argsort(descending=True)[:min(width, channels)]
    prune_mlp_channels(new, arch, strongest)
    with torch.no_grad():
        for name in arch.attn_out:
            up = get_module(new, name).up
            up.weight.zero_()
            if up.bias is not None:
                up.bias.zero_()
        down = get_module(new, arch.mlp_out)
        down.weight.zero_()
        if down.bias is not None:
            down.bias.zero_()
    return new


def _check_harmonizer_slot(view: SlotView) -> Problem | None:
    """A harmonizer slot: no wider than the layer it replaces (each rank at most min(out, in) of its
    linear, at most the MLP's channels), and its span exactly the original layers between its
    neighbours' (replaced layers and kept ones tile the middle, each layer once)."""
    slot = view.slot
    problem = shape_problem(view.where, slot.ranks, slot.channels, view.widths[view.pos])
    if problem is not None:
        return problem
    before, after = neighbours(view)
    if slot.replaces != list(range(before + 1, after)):
        return (f"{view.where}.replaces", slot.replaces,
                f"layers {before + 1} to {after - 1}, the ones between the neighbouring slots' layers "
                "(harmonizers and kept layers tile the middle, each layer once)")
    return None


HARMONIZER_SLOT = register_slot_kind("harmonizer", _check_harmonizer_slot,
                                     matches=lambda slot: slot.replaces is not None)
