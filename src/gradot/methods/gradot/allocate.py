"""Step 2 of GradOT: scores + budget -> a ``Plan`` (which components, channels and layers survive).
Pure bookkeeping, no modules.

Budget accounting counts the middle block's parameters exactly as the emulator will store them:
a rank-r factor pair costs ``r (in + out)``, and a matrix whose kept rank would not save
parameters stays dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...surgery import lowrank_saves_params
from .units import LayerScores, MatrixScores


@dataclass
class Plan:
    """What survives: per middle layer (original index) ranks (None = dense) and channel count."""

    ranks: dict[int, dict[str, int | None]] = field(default_factory=dict)
    channels: dict[int, int] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)

    def params(self, scores: list[LayerScores]) -> int:
        total = 0
        for ls in scores:
            if ls.index in self.dropped:
                continue
            total += ls.fixed + self.channels[ls.index] * ls.mlp.per_channel
            for m in ls.attn:
                r = self.ranks[ls.index][m.name]
                total += m.dense_params if r is None else m.stored_params(r)
        return total


def _rank_or_dense(m: MatrixScores, rank: int) -> int | None:
    return rank if lowrank_saves_params(m.in_f, m.out_f, rank) else None


def allocate_uniform(scores: list[LayerScores], target: int) -> Plan:
    """The same keep ratio in every matrix and MLP, then the rounding remainder handed out unit by
    unit so the achieved size lands within one unit of the target."""
    fixed = sum(ls.fixed for ls in scores)
    units = sum(sum(m.dense_params for m in ls.attn) + ls.mlp.channels * ls.mlp.per_channel for ls in scores)
    ratio = min(1.0, max(0.0, (target - fixed) / units))
    plan = Plan()
    if ratio >= 1.0:  # nothing to remove: every matrix dense, every channel kept
        for ls in scores:
            plan.ranks[ls.index] = {m.name: None for m in ls.attn}
            plan.channels[ls.index] = ls.mlp.channels
        return plan
    for ls in scores:
        plan.ranks[ls.index] = {}
        for m in ls.attn:
            rank = max(1, math.floor(ratio * m.dense_params / (m.in_f + m.out_f)))
            plan.ranks[ls.index][m.name] = _rank_or_dense(m, rank)
        plan.channels[ls.index] = max(1, min(ls.mlp.channels, math.floor(ratio * ls.mlp.channels)))
    # Hand out what rounding left, cheapest-to-grow units first, never overshooting.
    grew = True
    while grew:
        grew = False
        for ls in scores:
            room = target - plan.params(scores)
            if plan.channels[ls.index] < ls.mlp.channels and ls.mlp.per_channel <= room:
                plan.channels[ls.index] += 1
                grew = True
            for m in ls.attn:
                r = plan.ranks[ls.index][m.name]
                room = target - plan.params(scores)
                if r is not None and m.in_f + m.out_f <= room and _rank_or_dense(m, r + 1) is not None:
                    plan.ranks[ls.index][m.name] = r + 1
                    grew = True
    return plan


def _removal_candidates(scores: list[LayerScores], layers: bool) -> list[tuple]:
    """Every removable unit as ``(cost per parameter saved, kind, layer, detail)``, cheapest first:
    singular components beyond the protected ones, channels beyond one per MLP, and (``layers``)
    whole layers. On equal cost per parameter a whole layer goes first: same damage, a shallower
    (faster) emulator."""
    candidates = []
    for li, ls in enumerate(scores):
        for mi, m in enumerate(ls.attn):
            order = m.keep_order[m.protected:]
            # float64 division of the float32 costs: the same numbers as float(cost[j]) / n, in one op
            per_param = (m.cost[order].double() / (m.in_f + m.out_f)).tolist()
            candidates += [(c, "component", li, (mi, j)) for c, j in zip(per_param, order.tolist())]
        order = ls.mlp.keep_order[1:]  # keep at least one channel
        per_param = (ls.mlp.cost[order].double() / ls.mlp.per_channel).tolist()
        candidates += [(c, "channel", li, ch) for c, ch in zip(per_param, order.tolist())]
        if layers and len(scores) > 1:
            candidates.append((ls.cost / ls.params, "layer", li, None))
    candidates.sort(key=lambda c: (c[0], c[1] != "layer"))
    return candidates


def allocate_global(scores: list[LayerScores], target: int, layers: bool = False) -> Plan:
    """Remove, across the whole middle block, the units with the lowest curvature cost per
    parameter saved until the block fits ``target``: singular components, MLP channels and (with
    ``layers``) whole layers. A matrix whose remaining rank saves nothing is stored dense."""
    candidates = _removal_candidates(scores, layers)
    full_rank = [[len(m.svd.S) for m in ls.attn] for ls in scores]
    rank = [list(r) for r in full_rank]
    channels = [ls.mlp.channels for ls in scores]
    dropped = [False] * len(scores)

    def layer_params(li):
        ls = scores[li]
        if dropped[li]:
            return 0
        return ls.fixed + channels[li] * ls.mlp.per_channel + sum(
            m.stored_params(r) for m, r in zip(ls.attn, rank[li]))

    def step(kind, li, detail, delta) -> int:
        """Apply one unit's removal (-1) or return (+1); the change in the layer's parameters."""
        if kind == "component":
            m = scores[li].attn[detail[0]]
            r = rank[li][detail[0]]
            rank[li][detail[0]] = r + delta
            return m.stored_params(r + delta) - m.stored_params(r)
        channels[li] += delta
        return delta * scores[li].mlp.per_channel

    per_layer = [layer_params(li) for li in range(len(scores))]
    total = sum(per_layer)
    removed = []
    removed_from = [0] * len(scores)  # parameters units removed from each layer (what a give-back can return)
    alive = len(scores)
    for _, kind, li, detail in candidates:
        if total <= target:
            break
        if dropped[li]:
            continue
        if kind == "layer":
            if alive == 1:  # never drop the last middle layer
                continue
            returnable = sum(r for j, r in enumerate(removed_from) if j != li and not dropped[j])
            if total - per_layer[li] + returnable < target:
                continue  # the drop would undershoot the budget beyond what giving units back can fix
            dropped[li] = True
            alive -= 1
            change = -per_layer[li]
        else:
            change = step(kind, li, detail, -1)
            removed.append((kind, li, detail))
            removed_from[li] -= change
        total += change
        per_layer[li] += change
    # Dropping a whole layer can overshoot: give back the most costly removed units that fit.
    for kind, li, detail in reversed(removed):
        if dropped[li]:
            continue
        change = step(kind, li, detail, +1)
        if total + change <= target:
            total += change
            per_layer[li] += change
        else:
            step(kind, li, detail, -1)

    plan = Plan(dropped=[ls.index for ls, d in zip(scores, dropped) if d])
    for li, ls in enumerate(scores):
        plan.ranks[ls.index] = {m.name: _rank_or_dense(m, r) for m, r in zip(ls.attn, rank[li])}
        plan.channels[ls.index] = channels[li]
    return plan
