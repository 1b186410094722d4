"""How much one data owner may weigh and move in a round, and how updates are combined.

* The example-count cap: a client's claimed count above it is refused (FedAvg weights by the
  count, so an uncapped count is an uncapped weight).
* Update-norm clipping, Flower's fixed clipping (``flwr.supercore.differential_privacy``, as its
  ``DifferentialPrivacy*FixedClipping`` wrappers clip): every update is scaled down to an L2 norm
  of at most ``clip × ‖global adapter‖`` over all adapter tensors, so no client moves a round's mean
  further than its weight times that bound.
* The aggregation rules, Flower's own (``flwr.server.strategy.aggregate``, the functions behind
  ``FedAvg``, ``FedMedian``, ``FedTrimmedAvg`` and ``Krum``).
* The bound an aggregate must keep given clipping (checked before it is applied), and the same
  check for SecAgg+, whose server sees only the unmasked mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np
from flwr.server.strategy.aggregate import aggregate, aggregate_krum, aggregate_median, aggregate_trimmed_avg
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

from .core import UpdateRejected

__all__ = ["AGGREGATES", "KRUM_MALICIOUS", "aggregate_bound", "aggregate_updates", "check_secure_mean",
           "clip_update", "count_cap", "norm", "trim_fraction"]

#: ``--aggregate`` rules: FedAvg (example-weighted mean), FedMedian (coordinate-wise median),
#: FedTrimmedAvg (coordinate-wise trimmed mean), Krum (the update closest to its neighbours).
#: The last three ignore example counts.
AGGREGATES = ("fedavg", "median", "trimmed-mean", "krum")
#: Krum's ``f``, the number of hostile clients it is built to withstand.
KRUM_MALICIOUS = 1
#: SecAgg+'s quantisation levels (``SecAggPlusWorkflow``'s default ``quantization_range``).
_SECAGG_LEVELS = 2**22


def count_cap(counts: Sequence[int], max_examples: int, ratio: float) -> float:
    """The largest example count a client may claim this round: ``max_examples`` (0: none) and
    ``ratio`` × the low median of the round's claimed counts (0: none), whichever is lower. The
    low median (the smaller middle value of an even count) keeps one inflated count out of it."""
    caps = [float(max_examples)] if max_examples else []
    if ratio and counts:
        caps.append(ratio * statistics.median_low(counts))
    return min(caps) if caps else math.inf


def norm(arrays: Sequence[np.ndarray]) -> float:
    """The L2 norm over all tensors (Flower's ``get_norm``), in float64: no overflow to inf."""
    return get_norm([np.asarray(a, np.float64) for a in arrays])


def clip_update(update: Sequence[np.ndarray], bound: float) -> tuple[list[np.ndarray], float]:
    """``update`` in float64, scaled to an L2 norm of at most ``bound`` (0: not clipped) with
    Flower's ``clip_inputs_inplace``; also returns the norm it had."""
    out = [np.array(a, np.float64) for a in update]
    before = get_norm(out)
    if bound > 0 and before > 0:
        clip_inputs_inplace(out, bound)
    return out, before


def trim_fraction(n: int) -> float:
    """FedTrimmedAvg's fraction cut at each end: Flower's default 0.2, raised so that at least one
    client is cut at each end (with 3 clients 0.2 would cut none)."""
    return min(max(0.2, 1.0 / n), 0.49) if n > 2 else 0.0


def aggregate_updates(updates: list[tuple[list[np.ndarray], int]], rule: str) -> list[np.ndarray]:
    """Combine ``(update, example count)`` pairs by ``rule`` with Flower's aggregation functions."""
    if rule == "fedavg":
        return aggregate(updates)
    if rule == "median":
        return aggregate_median(updates)
    if rule == "trimmed-mean":
        return aggregate_trimmed_avg(updates, trim_fraction(len(updates)))
    if rule == "krum":
        return aggregate_krum(updates, KRUM_MALICIOUS, 0)
    raise ValueError(f"unknown aggregation rule {rule!r}; known: {', '.join(AGGREGATES)}")


def aggregate_bound(rule: str, clip_bound: float) -> float:
    """The norm an aggregate of updates clipped to ``clip_bound`` cannot exceed: a mean (FedAvg,
    trimmed mean) or one update (Krum) stays within it; a coordinate-wise median within √2 of it
    (each coordinate's median is at most the middle magnitude, so at most half the clients'
    squares, summed over coordinates, bound it)."""
    return clip_bound * (math.sqrt(2.0) if rule == "median" else 1.0)


def check_secure_mean(mean: Sequence[np.ndarray], bound: float, counts: Sequence[int], max_weight: float,
                      value_clip: float) -> None:
    """Refuse SecAgg+'s unmasked, example-weighted mean unless it is finite and within ``bound``
    (each honest client clips its update to ``bound`` before masking, so their mean cannot exceed
    it) plus SecAgg+'s quantisation error: per value less than one level (``2 × value_clip /
    2**22``) per client, divided by the summed weights ``Σ n_i / max_weight``."""
    for a in mean:
        if not np.isfinite(a).all():
            raise UpdateRejected("the unmasked sum holds NaN or infinite values")
    if bound <= 0:
        return
    weights = sum(counts) / max_weight
    numel = sum(a.size for a in mean)
    slack = math.sqrt(numel) * len(counts) * 2 * value_clip / _SECAGG_LEVELS / max(weights, 1e-12)
    got = norm(mean)
    if got > bound * (1 + 1e-6) + slack:
        raise UpdateRejected(f"the unmasked mean has norm {got:.4g}, beyond the {bound:.4g} that clipped updates "
                             f"can reach (a client did not clip, or sent NaN or garbage)")
