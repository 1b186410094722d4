"""CRaSh: cluster adjacent middle layers by the CKA of their outputs on calibration text, keep one
representative per cluster and repeat it over the cluster's positions (depth unchanged, weights
stored once).

The similarity and clustering functions are pure (numbers in, indices out); ``crash_emulator``
gathers the layer outputs and hands indices to ``emulator.assemble``.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..emulator import Emulator, assemble
from ..offload import plain_copy
from ..registry import decoder_layers
from ..slot_kinds import Problem, SlotView, register_slot_kind
from ..split import Split
from .base import Calibration, MethodConfig, SimpleMethod
from .uniform import layers_to_keep


def cka_matrix(outputs: list[torch.Tensor]) -> torch.Tensor:
    """Linear CKA of every pair of representations (each tokens x features), ``n x n`` float64.

    ``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with centred columns. Centring
    and the self terms are computed once per layer, not per pair (a third of the products), on
    the device the outputs lie on.
    """
    centred = [x.double() - x.double().mean(0) for x in outputs]
    norms = [(x.T @ x).norm() for x in centred]
    n = len(centred)
    sim = torch.ones(n, n, dtype=torch.float64)
    for a in range(n):
        for b in range(a + 1, n):
            denom = norms[a] * norms[b]
            cross = (centred[b].T @ centred[a]).norm() ** 2
            sim[a, b] = sim[b, a] = float(cross / denom) if denom > 0 else 0.0
    return sim


def cluster_adjacent(similarity: torch.Tensor, m: int) -> list[list[int]]:
    """Group ``n`` consecutive layers into ``m`` contiguous clusters.

    Agglomerative with an adjacency constraint: repeatedly merge the two neighbouring clusters
    whose least similar pair of layers is the most similar (complete linkage). Average linkage
    was tried first: on the default model the mid-stack layers are so alike that it grew one
    cluster of 17 layers, whose repeated representative made the emulator useless
    (WikiText-2 perplexity 5.8e7 at keep 0.4).
    """
    n = similarity.shape[0]
    if not 1 <= m <= n:
        raise ValueError(f"cannot make {m} clusters of {n} layers")
    clusters = [[i] for i in range(n)]
    while len(clusters) > m:
        def link(a, b):
            return similarity[a][:, b].min().item()
        best = max(range(len(clusters) - 1), key=lambda j: link(clusters[j], clusters[j + 1]))
        clusters[best : best + 2] = [clusters[best] + clusters[best + 1]]
    return clusters


def representative(similarity: torch.Tensor, cluster: list[int]) -> int:
    """The member most similar on average to the rest of its cluster (first on ties)."""
    if len(cluster) == 1:
        return cluster[0]
    sub = similarity[cluster][:, cluster]
    return cluster[int(sub.sum(1).argmax())]


@torch.no_grad()
def middle_layer_outputs(model: nn.Module, split: Split, batches, max_tokens: int = 4096) -> list[torch.Tensor]:
    """Each middle layer's output hidden states on calibration tokens (tokens x hidden)."""
    layers = decoder_layers(model)
    captured: dict[int, list[torch.Tensor]] = {i: [] for i in split.middle}
    hooks = []
    for i in split.middle:
        def hook(_mod, _inp, out, i=i):
            hidden = out[0] if isinstance(out, tuple) else out
            captured[i].append(hidden.reshape(-1, hidden.shape[-1]).float())  # stays on the model's device
        hooks.append(layers[i].register_forward_hook(hook))
    seen = 0
    try:
        device = next(model.parameters()).device
        for batch in tqdm(batches, desc="CRaSh: layer outputs", leave=False):
            model(input_ids=batch.to(device), use_cache=False)
            seen += batch.numel()
            if seen >= max_tokens:
                break
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(captured[i])[:max_tokens] for i in split.middle]


def crash_emulator(model: nn.Module, split: Split, keep: float, batches, max_tokens: int = 4096) -> Emulator:
    """CRaSh: cluster adjacent middle layers by CKA of their outputs, keep one per cluster and
    repeat it over the cluster's positions (depth unchanged, weights stored once)."""
    outputs = middle_layer_outputs(model, split, batches, max_tokens)
    n, tokens = len(outputs), outputs[0].shape[0]
    sim = cka_matrix(outputs)
    del outputs
    clusters = cluster_adjacent(sim, layers_to_keep(n, keep))
    layers = decoder_layers(model)
    middle, sources, shares = [], [], []
    for cluster in clusters:
        rep = representative(sim, cluster)
        owner = len(middle)
        for j, _ in enumerate(cluster):
            middle.append(plain_copy(layers[split.middle[rep]]) if j == 0 else None)
            sources.append(split.middle[rep])
            shares.append(None if j == 0 else owner)
    settings = {"clusters": [[split.middle[i] for i in c] for c in clusters], "linkage": "complete",
                "cka_tokens": tokens}
    return assemble(model, split, middle, sources, shares, method="crash", keep=keep, settings=settings)


def _check_shared_slot(view: SlotView) -> Problem | None:
    """A position repeating an earlier one's layer (``crash_emulator``): the same source and shapes as
    the position it shares (its weights are that position's; the manifest may not claim others)."""
    slot, owner = view.slot, view.slots[view.slot.shares]
    if slot.source != owner.source:
        return (f"{view.where}.source", slot.source,
                f"{owner.source}, the source of position {slot.shares} whose weights it shares")
    full = view.widths[view.pos].channels
    if (slot.channels or full) != (owner.channels or full):
        return (f"{view.where}.channels", slot.channels,
                f"{owner.channels or full}, the MLP channels of position {slot.shares} whose weights it shares")
    return None


SHARED_SLOT = register_slot_kind("shared", _check_shared_slot, matches=lambda slot: slot.shares is not None)


def _build(model: nn.Module, split: Split, config: MethodConfig, calibration: Calibration) -> Emulator:
    return crash_emulator(model, split, config.keep, calibration.batches)


#: CRaSh has no setting but ``keep`` (it compares layers on up to 4096 calibration tokens).
METHOD = SimpleMethod("crash", "CKA clustering + layer sharing", MethodConfig, True, _build)
