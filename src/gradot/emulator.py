"""The emulator: adapter layers around a compressed middle block, plus its manifest.

An emulator is an ordinary Hugging Face causal LM (same class as the base) whose decoder stack is
``bottom adapter + compressed middle + top adapter``. ``Slot`` records, per emulator position,
which original layer it came from, whether it re-uses another position's weights (CRaSh layer
sharing), and the shapes compression gave it, which is everything ``load_emulator`` needs to
rebuild the architecture without the original model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .registry import arch_of, decoder_layers, set_module
from .offload import plain_copy
from .slot_kinds import Problem, SlotView, register_slot_kind
from .split import Split, fingerprint
from .surgery import layer_shapes, set_depth, shared_copy, unique_parameter_count

FORMAT_VERSION = 1


@dataclass
class Slot:
    """One position of the emulator's decoder stack."""

    source: int  # index of the original layer it derives from
    role: str  # "adapter" or "middle"
    shares: int | None = None  # emulator position whose weights it re-uses
    ranks: dict[str, int] = field(default_factory=dict)  # low-rank linears and their ranks
    channels: int | None = None  # MLP intermediate channels kept
    # A trained stand-in (ScaleOT harmonizer) for this span of consecutive original middle layers
    # (``source`` first); None: the slot derives from ``source`` alone. Written only when set.
    replaces: list[int] | None = None


def _check_adapter_slot(view: SlotView) -> Problem | None:
    """An adapter position: the original layer, uncompressed (``assemble`` copies it whole), or the
    fine-tuned layers could never be plugged back into the original model."""
    slot, width = view.slot, view.widths[view.pos].channels
    if slot.ranks:
        return f"{view.where}.ranks", slot.ranks, "{} for an adapter position (adapter layers ship uncompressed)"
    if slot.channels not in (None, width):
        return (f"{view.where}.channels", slot.channels, f"{width}, the MLP width config.json gives the layer "
                "(an adapter layer is never pruned)")
    return None


ADAPTER_SLOT = register_slot_kind("adapter", _check_adapter_slot, matches=lambda slot: slot.role == "adapter")


@dataclass
class Emulator:
    model: nn.Module
    manifest: dict[str, Any]

    @property
    def slots(self) -> list[Slot]:
        return [Slot(**s) for s in self.manifest["slots"]]

    @property
    def adapter_positions(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s.role == "adapter"]

    @property
    def adapter_sources(self) -> list[int]:
        return [s.source for s in self.slots if s.role == "adapter"]

    def adapter_parameters(self) -> list[nn.Parameter]:
        layers = decoder_layers(self.model)
        return [p for i in self.adapter_positions for p in layers[i].parameters()]



def public_name(name_or_path: str) -> str:
    """``/home/me/models/llama-7b`` -> ``llama-7b``: a model's name without the folders above it."""
    name = str(name_or_path or "").rstrip("/\\")
    return name.replace("\\", "/").rsplit("/", 1)[-1]

def _copy_without_layers(model: nn.Module) -> nn.Module:
    """Deep copy of everything but the decoder layers (embeddings, norm, head, config)."""
    arch = arch_of(model)
    layers = decoder_layers(model)
    set_module(model, arch.layers, nn.ModuleList())
    try:
        return plain_copy(model)
    finally:
        set_module(model, arch.layers, layers)


def _slot_entry(slot: Slot) -> dict[str, Any]:
    entry = asdict(slot)
    if entry["replaces"] is None:
        del entry["replaces"]  # manifests without harmonizers are as before
    return entry


def middle_parameter_count(model: nn.Module, split: Split) -> int:
    layers = decoder_layers(model)
    return unique_parameter_count([layers[i] for i in split.middle])


def assemble(
    model: nn.Module,
    split: Split,
    middle: list[nn.Module],
    middle_sources: list[int],
    middle_shares: list[int | None],
    *,
    method: str,
    keep: float,
    settings: dict[str, Any] | None = None,
    replaces: dict[int, list[int]] | None = None,
) -> Emulator:
    """Build an emulator from compressed middle layers (already new modules, or shared copies).

    ``middle_shares[i]`` is the index, among ``middle``, of the layer whose weights position i
    re-uses (None: own weights). ``replaces[i]``: the span of original middle layers position i
    of ``middle`` stands in for (a harmonizer). The original ``model`` is left untouched.
    """
    arch = arch_of(model)
    original = decoder_layers(model)
    emu = _copy_without_layers(model)
    bottom = [plain_copy(original[i]) for i in split.bottom]
    top = [plain_copy(original[i]) for i in split.top]
    offset = len(bottom)
    middle = [shared_copy(middle[s]) if s is not None else m for m, s in zip(middle, middle_shares)]
    layers = bottom + middle + top
    sources = split.bottom + list(middle_sources) + split.top
    set_depth(emu, layers, sources)

    slots = []
    for pos, (layer, src) in enumerate(zip(layers, sources)):
        is_middle = offset <= pos < offset + len(middle)
        share = middle_shares[pos - offset] if is_middle else None
        ranks, channels = layer_shapes(layer, arch)
        slots.append(Slot(
            source=src,
            role="middle" if is_middle else "adapter",
            shares=None if share is None else share + offset,
            ranks=ranks,
            channels=channels,
            replaces=(replaces or {}).get(pos - offset) if is_middle else None,
        ))

    original_middle = middle_parameter_count(model, split)
    kept_middle = unique_parameter_count(middle)
    manifest = {
        "format": "gradot-emulator",
        "format_version": FORMAT_VERSION,
        "method": method,
        "keep_requested": keep,
        "model_type": model.config.model_type,
        "base": {
            "num_layers": split.num_layers,
            # The model's name (folder or file name), not the model owner's local path to it.
            "name_or_path": public_name(getattr(model.config, "_name_or_path", "")),
            "fingerprint": fingerprint(model, split),
        },
        "adapter": {"k": split.k, "bottom": split.bottom, "top": split.top},
        "size": {
            "middle_params_original": original_middle,
            "middle_params_kept": kept_middle,
            "keep_achieved": kept_middle / original_middle,
            "emulator_params": unique_parameter_count([emu]),
            "emulator_depth": len(layers),
        },
        "settings": settings or {},
        "slots": [_slot_entry(s) for s in slots],
    }
    return Emulator(emu, manifest)
