"""The offsite-tuning split: adapter = bottom k and top k decoder layers, middle = the rest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn

from .offload import onloaded
from .registry import arch_of, decoder_layers
from .errors import SplitError  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Split:
    num_layers: int
    k: int

    def __post_init__(self):
        if self.k < 1:
            raise SplitError(f"adapter size k must be >= 1, got {self.k}")
        if self.num_layers < 2 * self.k + 1:
            raise SplitError(
                f"model has {self.num_layers} decoder layers; an adapter of k={self.k} bottom and top layers "
                f"needs at least {2 * self.k + 1} (2k plus one middle layer)"
            )

    @property
    def bottom(self) -> list[int]:
        return list(range(self.k))

    @property
    def top(self) -> list[int]:
        return list(range(self.num_layers - self.k, self.num_layers))

    @property
    def adapter(self) -> list[int]:
        return self.bottom + self.top

    @property
    def middle(self) -> list[int]:
        return list(range(self.k, self.num_layers - self.k))


def split_model(model: nn.Module, k: int = 2) -> Split:
    return Split(len(decoder_layers(model)), k)


def adapter_state_dict(model: nn.Module, layer_indices: list[int], positions: list[int] | None = None) -> dict[str, torch.Tensor]:
    """Adapter tensors named as in the ORIGINAL model (``<layers>.<original index>.<param>``).

    ``positions[i]`` is where original layer ``layer_indices[i]`` sits in ``model`` (an emulator
    keeps the top adapter layers at other positions than the original does).
    """
    prefix = arch_of(model).layers
    layers = decoder_layers(model)
    positions = positions if positions is not None else layer_indices
    out = {}
    for index, pos in zip(layer_indices, positions):
        for name, tensor in layers[pos].state_dict().items():
            out[f"{prefix}.{index}.{name}"] = tensor
    return out


_CONFIG_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "vocab_size", "n_embd", "n_layer", "ffn_dim",
)


def fingerprint(model: nn.Module, split: Split, as_dtype: torch.dtype | None = None) -> str:
    """Base-model fingerprint: sha256 of the architecture config and the ORIGINAL adapter tensors.

    An adapter carries the fingerprint of the model it was split from; plugging it into another
    model is refused. Tensors are hashed as float32 so a bf16 and an fp32 load of the same
    checkpoint agree only when the values do. ``as_dtype``: round the tensors to this dtype first,
    to compare a float32 model with a fingerprint taken from its bfloat16 (or float16) load.
    """
    h = hashlib.sha256()
    config = {f: getattr(model.config, f, None) for f in _CONFIG_FIELDS}
    h.update(json.dumps(config, sort_keys=True).encode())
    layers = decoder_layers(model)
    with onloaded(*(layers[i] for i in split.adapter)):  # weights a device map offloaded
        for name, tensor in sorted(adapter_state_dict(model, split.adapter).items()):
            h.update(name.encode())
            tensor = tensor.detach() if as_dtype is None else tensor.detach().to(as_dtype)
            h.update(tensor.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()
