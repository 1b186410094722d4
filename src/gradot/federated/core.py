"""What crosses the wire in a federation, how each side checks it, and how updates are combined.

The server (model owner) sends the current global adapter; each client (data owner) fine-tunes
it on its own data and sends back its update, the difference ``local - global`` of every adapter
tensor (the same tensors a ``gradot finetune`` adapter holds, named as in the original model; never
anything else of the emulator). Arrays travel in :class:`AdapterSpec` order; a digest of the spec
(names, shapes, dtypes) and the base-model fingerprint travel beside them, so either side can tell
an update for another model, another split or another layout from a good one, the way
``gradot.artifacts.plug_in`` checks an adapter folder: fingerprint, tensor names, shapes, dtypes,
finite values. Differences rather than weights keep the values small, which SecAgg+'s fixed-point
encoding needs (it clips every value to ``[-clip, clip]``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..emulator import Emulator
from ..registry import arch_of, decoder_layers
from ..split import adapter_state_dict

__all__ = [
    "AdapterSpec",
    "UpdateRejected",
    "adapter_parameters_by_name",
    "adapter_tensors",
    "apply_update",
    "check_arrays",
    "check_update",
    "largest_change",
    "load_arrays",
    "to_arrays",
]


class UpdateRejected(ValueError):
    """A message whose adapter tensors or metadata fail a check (the reason is the message)."""


@dataclass(frozen=True)
class AdapterSpec:
    """The adapter's layout: tensor names (original-model naming, sorted), shapes, dtypes, and the
    base-model fingerprint of the emulator's manifest."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    fingerprint: str

    @classmethod
    def of(cls, emulator: Emulator) -> AdapterSpec:
        tensors = adapter_tensors(emulator)
        names = tuple(sorted(tensors))
        return cls(names=names,
                   shapes=tuple(tuple(tensors[n].shape) for n in names),
                   dtypes=tuple(str(tensors[n].detach().cpu().numpy().dtype) for n in names),
                   fingerprint=emulator.manifest["base"]["fingerprint"])

    @property
    def digest(self) -> str:
        """sha256 of the layout (names, shapes, dtypes): equal digests, same tensors in the same order."""
        text = json.dumps([self.names, self.shapes, self.dtypes])
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in zip(self.shapes, self.dtypes))

    @property
    def numel(self) -> int:
        return sum(int(np.prod(s)) for s in self.shapes)


def adapter_tensors(emulator: Emulator) -> dict[str, torch.Tensor]:
    """The emulator's adapter tensors under their original names (views: writing them writes the model)."""
    return adapter_state_dict(emulator.model, emulator.adapter_sources, emulator.adapter_positions)


def adapter_parameters_by_name(emulator: Emulator) -> dict[str, torch.nn.Parameter]:
    """The trainable adapter parameters under the same names as :func:`adapter_tensors`."""
    prefix = arch_of(emulator.model).layers
    layers = decoder_layers(emulator.model)
    return {f"{prefix}.{index}.{name}": p
            for index, pos in zip(emulator.adapter_sources, emulator.adapter_positions)
            for name, p in layers[pos].named_parameters()}


def to_arrays(emulator: Emulator, spec: AdapterSpec) -> list[np.ndarray]:
    tensors = adapter_tensors(emulator)
    return [tensors[n].detach().cpu().numpy().copy() for n in spec.names]


def load_arrays(emulator: Emulator, spec: AdapterSpec, arrays: Sequence[np.ndarray]) -> None:
    """Write ``arrays`` (already checked) into the emulator's adapter layers."""
    tensors = adapter_tensors(emulator)
    with torch.no_grad():
        for name, a in zip(spec.names, arrays):
            tensors[name].copy_(torch.from_numpy(np.ascontiguousarray(a)).to(tensors[name].dtype))


def check_arrays(arrays: Sequence[np.ndarray], spec: AdapterSpec, what: str = "update") -> None:
    """Raise :class:`UpdateRejected` unless ``arrays`` match ``spec`` tensor by tensor and are finite."""
    if len(arrays) != len(spec.names):
        raise UpdateRejected(f"{what} has {len(arrays)} tensors, the adapter has {len(spec.names)}")
    for a, name, shape, dtype in zip(arrays, spec.names, spec.shapes, spec.dtypes):
        if not isinstance(a, np.ndarray):
            raise UpdateRejected(f"{what}: {name} is not an array")
        if tuple(a.shape) != shape:
            raise UpdateRejected(f"{what}: {name} has shape {list(a.shape)}, the adapter's is {list(shape)}")
        if str(a.dtype) != dtype:
            raise UpdateRejected(f"{what}: {name} has dtype {a.dtype}, the adapter's is {dtype}")
        if not np.isfinite(a).all():
            raise UpdateRejected(f"{what}: {name} holds NaN or infinite values")


def check_update(arrays: Sequence[np.ndarray], num_examples, metrics: dict, spec: AdapterSpec,
                 check_values: bool = True) -> None:
    """The server's check of one client's reply: its claimed fingerprint and layout, its example
    count, and (unless the values are only visible summed, as under SecAgg+) the tensors."""
    if metrics.get("fingerprint") != spec.fingerprint:
        raise UpdateRejected("base-model fingerprint does not match (an update for an emulator of another model)")
    if metrics.get("spec") != spec.digest:
        raise UpdateRejected("tensor names, shapes or dtypes differ from the adapter's (layout digest mismatch)")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1:
        raise UpdateRejected(f"example count {num_examples!r} is not a positive integer")
    if check_values:
        check_arrays(arrays, spec)


def largest_change(update: Sequence[np.ndarray], global_arrays: Sequence[np.ndarray],
                   spec: AdapterSpec) -> tuple[str, float]:
    """The tensor the update moves furthest, relative to its global value: ``||u|| / ||g||`` (as
    ``plug_in`` measures an adapter's change from the original)."""
    worst, ratio = "", 0.0
    for name, u, g in zip(spec.names, update, global_arrays):
        r = float(np.linalg.norm(u.astype(np.float64)) / max(np.linalg.norm(g.astype(np.float64)), 1e-12))
        if r > ratio:
            worst, ratio = name, r
    return worst, ratio


def apply_update(global_arrays: Sequence[np.ndarray], update: Sequence[np.ndarray]) -> list[np.ndarray]:
    """``global + update`` in float64, returned in the global arrays' dtypes."""
    return [(g.astype(np.float64) + u.astype(np.float64)).astype(g.dtype) for g, u in zip(global_arrays, update)]
