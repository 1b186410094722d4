"""Bounds on an emulator's slots: one check per kind of slot, registered next to the code that
builds that kind (``surgery``: kept layers, low-rank or pruned; ``emulator``: adapter layers;
``methods.crash``: shared positions; ``methods.harmonizers``: ScaleOT's harmonizers), so that a new
kind of slot brings its own bounds (``artifacts.emulator_io`` imports the modules that register one).

A check sees one slot with the widths the base config gives its position (each linear's
``(out, in)`` and the MLP's channels, read off the architecture built on the meta device) and the
other slots; it returns what is wrong as ``(field, value, expected)`` or None. ``check_slots``
runs every slot's check before a tensor is read, and the cross-slot rule every kind shares: the
original middle layers the slots stand for come in order, each at most once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Widths:
    """What the base config gives one position: every compressible linear's ``(out, in)`` at full
    width, and the MLP's channel count."""

    linears: dict[str, tuple[int, int]]
    channels: int
    mlp_in: tuple[str, ...]  # the linears whose outputs are MLP channels (``mlp_in_parts`` blocks each)
    mlp_out: str  # the linear whose inputs are MLP channels
    mlp_in_parts: int = 1

    def at_channels(self, channels: int) -> dict[str, tuple[int, int]]:
        """Each linear's ``(out, in)`` once the MLP keeps ``channels`` channels."""
        shapes = dict(self.linears)
        for name in self.mlp_in:
            shapes[name] = (channels * self.mlp_in_parts, shapes[name][1])
        shapes[self.mlp_out] = (shapes[self.mlp_out][0], channels)
        return shapes


@dataclass(frozen=True)
class SlotView:
    """One slot in its emulator: position, the slot, every slot, each position's widths, and the
    original middle layers (``middle``)."""

    pos: int
    slot: Any  # an ``emulator.Slot``
    slots: Sequence[Any]
    widths: Sequence[Widths]
    middle: range

    @property
    def where(self) -> str:
        return f"slots[{self.pos}]"


Problem = tuple[str, Any, str]  # (field, value, expected)


@dataclass(frozen=True)
class SlotKind:
    name: str
    matches: Callable[[Any], bool] | None  # None: the kind of every slot no other kind claims
    check: Callable[[SlotView], Problem | None]


#: The registered kinds, by name (``register_slot_kind``).
SLOT_KINDS: dict[str, SlotKind] = {}


def register_slot_kind(name: str, check: Callable[[SlotView], Problem | None],
                       matches: Callable[[Any], bool] | None = None) -> SlotKind:
    """Add a kind of slot: ``check`` bounds the slots ``matches`` claims (None: every slot no other
    kind claims). The module that builds the kind registers it."""
    SLOT_KINDS[name] = kind = SlotKind(name, matches, check)
    return kind


def kind_of(slot) -> SlotKind:
    for kind in SLOT_KINDS.values():
        if kind.matches is not None and kind.matches(slot):
            return kind
    fallback = [kind for kind in SLOT_KINDS.values() if kind.matches is None]
    if len(fallback) != 1:
        raise RuntimeError(f"expected one fallback slot kind, have {[k.name for k in fallback]}")
    return fallback[0]


def covered(slot) -> list[int]:
    """The original layers a slot with its own weights stands for: a harmonizer's span, else its source."""
    return list(slot.replaces) if slot.replaces is not None else [slot.source]


def neighbours(view: SlotView) -> tuple[int, int]:
    """The last original layer an earlier own-weight middle slot covers and the first a later one
    covers (the middle's bounds, one outside, where there is none)."""
    own = [(pos, covered(s)) for pos, s in enumerate(view.slots)
           if s.role == "middle" and s.shares is None and pos != view.pos]
    before = [span[-1] for pos, span in own if pos < view.pos]
    after = [span[0] for pos, span in own if pos > view.pos]
    return (before[-1] if before else view.middle.start - 1), (after[0] if after else view.middle.stop)


def check_slots(slots: Sequence[Any], widths: Sequence[Widths], middle: range) -> Problem | None:
    """The first problem of any slot (its kind's bounds), or of their order; None when all fit."""
    last = middle.start - 1
    for pos, slot in enumerate(slots):
        view = SlotView(pos, slot, slots, widths, middle)
        problem = kind_of(slot).check(view)
        if problem is not None:
            return problem
        if slot.role == "middle" and slot.shares is None:
            span = covered(slot)
            if span[0] <= last:
                field = "replaces" if slot.replaces is not None else "source"
                return (f"{view.where}.{field}", span if slot.replaces is not None else slot.source,
                        f"original layers after {last} (an earlier slot stands for layer {last}; "
                        f"each middle layer at most once, in order)")
            last = span[-1]
    return None
