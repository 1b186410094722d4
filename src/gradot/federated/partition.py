"""Splitting one training set over simulated data owners: IID, or skewed by label.

``iid``: a seeded shuffle cut into near-equal parts. ``label``: each client draws its share of
every label from a Dirichlet(``alpha``) distribution (the usual label-skew benchmark; small
``alpha``, e.g. 0.3, gives clients dominated by one or two labels, large ``alpha`` tends to IID).
For the multiple-choice tasks the label is the position of the gold answer (A/B/C/D...); data
without labels (``--data``) splits only IID. Every row goes to exactly one client; every client
gets at least one row.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["PARTITIONS", "client_records", "partition_indices"]

PARTITIONS = ("iid", "label")


def partition_indices(n: int, num_clients: int, how: str = "iid", labels: Sequence[int] | None = None,
                      alpha: float = 0.5, seed: int = 0) -> list[list[int]]:
    """Row indices of each client (disjoint, covering ``range(n)``)."""
    if num_clients < 1 or n < num_clients:
        raise ValueError(f"cannot split {n} rows over {num_clients} clients")
    rng = np.random.default_rng(seed)
    if how == "iid":
        order = rng.permutation(n)
        return [sorted(int(i) for i in part) for part in np.array_split(order, num_clients)]
    if how != "label":
        raise ValueError(f"unknown partition {how!r}; known: {', '.join(PARTITIONS)}")
    if labels is None or len(labels) != n:
        raise ValueError("a label partition needs one label per row (multiple-choice task data)")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    labels = np.asarray(labels)
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet([alpha] * num_clients)
        cuts = (np.cumsum(shares)[:-1] * len(rows)).round().astype(int)
        for c, chunk in enumerate(np.split(rows, cuts)):
            parts[c].extend(int(i) for i in chunk)
    # No empty client: move one row from the largest part to each empty one.
    for c in range(num_clients):
        if not parts[c]:
            donor = max(range(num_clients), key=lambda j: len(parts[j]))
            parts[c].append(parts[donor].pop())
    return [sorted(p) for p in parts]


def client_records(conf: dict) -> list:
    """A data owner's training records from its node config (see ``apps.NODE_CONFIG``): the task's
    train split (or ``data``), cut to ``train-limit`` rows, then its ``partition-id`` share of
    ``num-partitions`` (``partition`` iid/label, ``alpha``, ``seed``). One node per data owner in a
    real deployment: ``num-partitions`` 1 (the default) keeps all of its data."""
    from ..finetune import task_records
    from ..evaluation.tasks import load_task

    limit = int(conf["train-limit"]) if conf.get("train-limit") else None
    labels = None
    if conf.get("task"):
        examples = load_task(str(conf["task"]), "train", data_dir=conf.get("data-dir") or None, limit=limit)
        records = task_records(examples)
        labels = [getattr(e, "gold", 0) for e in examples]
    elif conf.get("data"):
        from ..corpora import load_corpus

        loaded = load_corpus(str(conf["data"]), limit=limit)
        records = [loaded] if isinstance(loaded, str) else [
            r if isinstance(r, str) else (r.prompt, r.continuation()) for r in loaded]
    else:
        raise ValueError("the data owner's config needs task='<task>' or data='<file>'")
    num = int(conf.get("num-partitions", 1))
    pid = int(conf.get("partition-id", 0))
    if num == 1:
        return records
    if not 0 <= pid < num:
        raise ValueError(f"partition-id {pid} is not in [0, {num})")
    how = str(conf.get("partition", "iid"))
    parts = partition_indices(len(records), num, how, labels if how == "label" else None,
                              float(conf.get("alpha", 0.5)), int(conf.get("seed", 0)))
    return [records[i] for i in parts[pid]]
