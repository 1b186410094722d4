"""Model surgery: the only code that replaces or reshapes modules.

Selection (which layers, components or channels to keep) happens elsewhere and arrives here as
indices; this module turns indices into modules. Every operation also has a "shape only" twin used
by ``load_emulator`` to rebuild the architecture from a manifest before the weights are loaded.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.nn.utils import skip_init

from .registry import ArchSpec, arch_of, get_module, linear_shape, set_module, weight_out_in
from .slot_kinds import Problem, SlotView, Widths, register_slot_kind

# ---------------------------------------------------------------------------------------------
# Low-rank linear (DRD)


class LowRankLinear(nn.Module):
    """``y = C (B x) + b``: a rank-``r`` factorisation of an ``out x in`` linear.

    Two plain ``nn.Linear`` so that PEFT, quantizers and device maps see ordinary linears.
    """

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool, dtype=None, device=None,
                 init: bool = True):
        super().__init__()
        self.in_features, self.rank, self.out_features = in_features, rank, out_features
        # init=False: uninitialised memory, for callers that overwrite every weight right away.
        make = nn.Linear if init else partial(skip_init, nn.Linear)
        self.down = make(in_features, rank, bias=False, dtype=dtype, device=device)
        self.up = make(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` product (for scoring and reconstruction checks only)."""
        return self.up.weight @ self.down.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias


def to_lowrank(module: nn.Module, arch: ArchSpec, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor,
               kept: torch.Tensor) -> LowRankLinear:
    """Factor ``module`` keeping the singular components at indices ``kept`` of ``W = U diag(S) Vh``.

    ``B = S^½ Vh`` and ``C = U S^½`` share the singular values evenly, which keeps both factors
    on the same scale for fine-tuning and low-precision storage.
    """
    out_f, in_f = linear_shape(module, arch)
    has_bias = module.bias is not None
    w = weight_out_in(module, arch)
    root = S[kept].sqrt()
    new = LowRankLinear(in_f, len(kept), out_f, has_bias, dtype=w.dtype, device=w.device, init=False)
    with torch.no_grad():
        new.down.weight.copy_((root[:, None] * Vh[kept]).to(w.dtype))
        new.up.weight.copy_((U[:, kept] * root[None, :]).to(w.dtype))
        if has_bias:
            new.up.bias.copy_(module.bias)
    return new


def lowrank_saves_params(in_f: int, out_f: int, rank: int) -> bool:
    """A rank-r factor pair stores r(in+out) numbers; it only pays below in*out."""
    return rank * (in_f + out_f) < in_f * out_f


# ---------------------------------------------------------------------------------------------
# MLP channel pruning (SCP)


def _slice_linear(module: nn.Module, arch: ArchSpec, kept: torch.Tensor, dim: str) -> nn.Module:
    """Keep the output units (``dim='out'``) or input units (``dim='in'``) at indices ``kept`` of a linear."""
    w = weight_out_in(module, arch).detach()
    kept = kept.to(w.device)
    w = w[kept] if dim == "out" else w[:, kept]
    bias = module.bias
    if bias is not None and dim == "out":
        bias = bias[kept]
    out_f, in_f = w.shape
    if arch.stores_transposed(module):  # rebuilt as the same kind, in x out
        new = type(module)(out_f, in_f)
        new.weight = nn.Parameter(w.T.contiguous())
        new.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        return new.to(w.device)
    new = skip_init(nn.Linear, in_f, out_f, bias=bias is not None, dtype=w.dtype, device=w.device)  # overwritten next
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def prune_mlp_channels(layer: nn.Module, arch: ArchSpec, kept: torch.Tensor) -> None:
    """Keep the MLP intermediate channels at indices ``kept``: rows of gate/up (and biases), columns of down."""
    kept = torch.as_tensor(kept, dtype=torch.long).sort().values
    channels = mlp_channels(layer, arch)
    rows = torch.cat([kept + part * channels for part in range(arch.mlp_in_parts)])  # fused blocks stacked
    for name in arch.mlp_in:
        set_module(layer, name, _slice_linear(get_module(layer, name), arch, rows, "out"))
    set_module(layer, arch.mlp_out, _slice_linear(get_module(layer, arch.mlp_out), arch, kept, "in"))


def mlp_channels(layer: nn.Module, arch: ArchSpec) -> int:
    return linear_shape(get_module(layer, arch.mlp_out), arch)[1]


# ---------------------------------------------------------------------------------------------
# Shapes from a manifest (load path)


def reshape_layer(layer: nn.Module, arch: ArchSpec, ranks: dict[str, int], channels: int | None) -> None:
    """Give ``layer`` the shapes a manifest records (weights are loaded afterwards)."""
    if channels is not None and channels != mlp_channels(layer, arch):
        prune_mlp_channels(layer, arch, torch.arange(channels))
    for name, rank in ranks.items():
        module = get_module(layer, name)
        out_f, in_f = linear_shape(module, arch)
        w = weight_out_in(module, arch)
        set_module(layer, name, LowRankLinear(in_f, rank, out_f, module.bias is not None, dtype=w.dtype,
                                              device=w.device))


def layer_widths(layer: nn.Module, arch: ArchSpec) -> Widths:
    """The widths an unmodified ``layer`` has: what a slot's ranks and channels are bounded by."""
    linears = {name: linear_shape(get_module(layer, name), arch) for name in arch.attn_linears + arch.mlp_linears}
    return Widths(linears, mlp_channels(layer, arch), arch.mlp_in, arch.mlp_out, arch.mlp_in_parts)


def shape_problem(where: str, ranks: dict[str, int], channels: int | None, widths: Widths) -> Problem | None:
    """A layer's stated shapes against its full widths: at most the MLP's channels, and a rank of at
    most min(out, in) on each of its own compressible linears (after the channel pruning)."""
    if channels is not None and not 1 <= channels <= widths.channels:
        return (f"{where}.channels", channels,
                f"1 to {widths.channels} MLP channels (the width config.json gives this layer)")
    shapes = widths.at_channels(channels or widths.channels)
    for name, rank in ranks.items():
        if name not in shapes:
            return f"{where}.ranks", name, f"one of the layer's linears ({', '.join(shapes)})"
        bound = min(shapes[name])
        if not 1 <= rank <= bound:
            return (f"{where}.ranks.{name}", rank,
                    f"a rank of 1 to {bound}, min(out, in) of that linear {list(shapes[name])} in config.json")
    return None


def _check_layer_slot(view: SlotView) -> Problem | None:
    """A kept middle layer, whole, low-rank (``to_lowrank``) or pruned (``prune_mlp_channels``)."""
    return shape_problem(view.where, view.slot.ranks, view.slot.channels, view.widths[view.pos])


LAYER_SLOT = register_slot_kind("layer", _check_layer_slot)  # every slot no other kind claims


def layer_shapes(layer: nn.Module, arch: ArchSpec) -> tuple[dict[str, int], int]:
    """``(ranks of low-rank linears, MLP channel count)``: what the manifest records per layer."""
    ranks = {
        name: get_module(layer, name).rank
        for name in arch.attn_linears + arch.mlp_linears
        if isinstance(get_module(layer, name), LowRankLinear)
    }
    return ranks, mlp_channels(layer, arch)


# ---------------------------------------------------------------------------------------------
# Assembling a decoder stack


def shared_copy(layer: nn.Module) -> nn.Module:
    """A structural copy of ``layer`` whose parameters ARE the original's (layer sharing).

    A separate module object is needed so that it can carry its own ``layer_idx`` for the KV cache;
    the weights are stored and trained once.
    """
    twin = copy.deepcopy(layer)
    originals = dict(layer.named_parameters())
    for name in list(dict(twin.named_parameters())):
        owner_name, _, attr = name.rpartition(".")
        owner = twin.get_submodule(owner_name) if owner_name else twin
        setattr(owner, attr, originals[name])
    return twin


def renumber_layers(layers: Sequence[nn.Module]) -> None:
    """Give every attention module its position as ``layer_idx`` (KV-cache slot)."""
    for position, layer in enumerate(layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position


def set_depth(model: nn.Module, layers: list[nn.Module], sources: Sequence[int]) -> None:
    """Install ``layers`` as the decoder stack; ``sources[i]`` is the original index of position i.

    Per-layer config lists (e.g. ``layer_types`` for sliding-window attention) follow the layers.
    """
    arch = arch_of(model)
    config = model.config
    for attr in arch.per_layer_config:
        values = getattr(config, attr, None)
        if isinstance(values, (list, tuple)) and values:
            setattr(config, attr, [values[s] for s in sources])
    config.num_hidden_layers = len(layers)
    renumber_layers(layers)
    set_module(model, arch.layers, nn.ModuleList(layers))


def unique_parameter_count(modules: Sequence[nn.Module]) -> int:
    """Parameters of ``modules`` counted once even when layers share them."""
    seen: dict[int, int] = {}
    for module in modules:
        for p in module.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())
