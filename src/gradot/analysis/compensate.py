"""Training-free compensation: refit the kept middle layers' MLP output projections by least squares.

An emulator's middle block changes the hidden states that reach the top adapter layers; an adapter
trained on it partly learns to undo that shift, which does not transfer. Here the model owner, on
public calibration text and without any gradient step, refits each kept middle layer's MLP output
projection (``mlp_out`` in the architecture registry: ``down_proj``, ``fc2``, ``c_proj``) so that
the emulator's residual stream after that layer matches the original's at the point the next
emulator layer stands for (for a dropped span: the original's stream after the whole span):

    W' = argmin ||M W'ᵀ − R||² + α ||W' − W||²,  R = target − (residual before the MLP) − bias

with M the MLP's intermediate activations on the emulator's own (already refitted) inputs. The
ridge pulls toward the current weights, so little calibration data cannot wreck a layer. Layers are
refitted in order, each on the outputs of the ones before. Shapes do not change: the emulator
stays loadable from its manifest, which records the settings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..emulator import Emulator
from ..registry import arch_of, decoder_layers, get_module, weight_out_in
from ..errors import CompensationError  # noqa: F401  (re-exported)


class _Stop(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the forward is not needed."""


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def _original_streams(model: nn.Module, batches: Sequence[torch.Tensor], wanted: set[int]) -> dict[int, list[torch.Tensor]]:
    """The original's residual stream at the input of each ``wanted`` layer index, per batch."""
    layers = decoder_layers(model)
    streams: dict[int, list[torch.Tensor]] = {i: [] for i in wanted}
    handles = [layers[i].register_forward_pre_hook(
        lambda mod, args, kwargs, i=i: streams[i].append((args[0] if args else kwargs["hidden_states"]).detach().clone()),
        with_kwargs=True) for i in wanted]
    try:
        for ids in tqdm(batches, desc="compensation: original streams", leave=False):
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return streams


@torch.no_grad()
def _refit_one(model: nn.Module, position: int, batches, targets: list[torch.Tensor], ridge: float) -> float:
    """Refit one position's MLP output projection; returns the relative residual error after."""
    arch = arch_of(model)
    layer = decoder_layers(model)[position]
    proj = get_module(layer, arch.mlp_out)
    weight = weight_out_in(proj, arch)  # out x in
    bias = getattr(proj, "bias", None)
    gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64)
    cross = torch.zeros(weight.shape[1], weight.shape[0], dtype=torch.float64)
    rr = torch.zeros((), dtype=torch.float64)
    captured: dict[str, torch.Tensor] = {}

    def grab_input(mod, args):
        captured["m"] = args[0].detach()

    def stop_after(mod, args, output):
        captured["out"] = _hidden(output).detach()
        raise _Stop

    handles = [proj.register_forward_pre_hook(grab_input), layer.register_forward_hook(stop_after)]
    try:
        for ids, target in zip(batches, targets):
            try:
                model(input_ids=ids.to(weight.device), use_cache=False)
            except _Stop:
                pass
            m = captured["m"].reshape(-1, weight.shape[1]).double()
            contribution = m @ weight.T.double() + (bias.double() if bias is not None else 0)
            before_mlp = captured["out"].reshape(-1, weight.shape[0]).double() - contribution
            r = target.reshape(-1, weight.shape[0]).double() - before_mlp
            if bias is not None:
                r = r - bias.double()
            gram += m.T @ m
            cross += m.T @ r
            rr += (r * r).sum()
    finally:
        for h in handles:
            h.remove()
    w0 = weight.T.double()  # in x out
    alpha = ridge * gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    solved = torch.linalg.solve(gram + alpha * eye, cross + alpha * w0)  # in x out
    # Residual error of the fit, relative to the error of the weights it replaces.
    err_new = rr + (solved.T @ gram @ solved).trace() - 2 * (solved * cross).sum()
    err_old = rr + (w0.T @ gram @ w0).trace() - 2 * (w0 * cross).sum()
    weight.copy_(solved.T.to(weight.dtype))
    return float(err_new / err_old) if err_old != 0 else float("nan")


def compensate(original: nn.Module, emulator: Emulator, batches: Sequence[torch.Tensor], *,
               ridge: float = 1e-2, scope: str = "all") -> Emulator:
    """Refit the emulator's middle MLP output projections in place (see the module docstring).

    ``scope``: ``all`` refits every middle position in order; ``last`` only the last one (the layer
    whose output the top adapter reads). ``ridge`` scales the pull toward the current weights,
    relative to the mean diagonal of the activations' Gram matrix.
    """
    if scope not in ("all", "last"):
        raise ValueError(f"scope must be 'all' or 'last', got {scope!r}")
    if not ridge > 0:
        raise ValueError(f"ridge must be > 0, got {ridge!r}")
    slots = emulator.slots
    if any(s.shares is not None for s in slots):
        raise CompensationError("compensation refits each middle layer on its own; this emulator shares layers")
    middle = [p for p, s in enumerate(slots) if s.role == "middle"]
    if not middle:
        raise CompensationError("the emulator has no middle layers to refit")
    positions = middle if scope == "all" else middle[-1:]
    # What each refitted position must output: the original's stream entering the next position's source.
    next_source = {p: slots[p + 1].source for p in positions}
    streams = _original_streams(original, batches, set(next_source.values()))
    emulator.model.eval()
    errors = {}
    for p in tqdm(positions, desc="compensation: refit", leave=False):
        errors[p] = _refit_one(emulator.model, p, batches, streams[next_source[p]], ridge)
    emulator.manifest.setdefault("settings", {})["compensation"] = {
        "kind": "least-squares refit of middle MLP output projections",
        "scope": scope, "ridge": ridge,
        "tokens": int(sum(b.numel() for b in batches)),
        "relative_error": {str(p): round(e, 4) for p, e in errors.items()},
    }
    return emulator
