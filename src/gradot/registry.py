"""Architecture registry: the only place that knows where things live inside a model.

Keyed by ``config.model_type`` (as PEFT does). Each entry names, relative to the model root or to one
decoder layer, the decoder-layer list and the linears that compression touches. Everything else in
gradot asks the registry instead of testing ``isinstance``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from .errors import UnsupportedModelError  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class ArchSpec:
    """Where one architecture keeps its decoder layers and the linears inside each layer.

    Linear names are relative to a decoder layer. ``attn_in`` read the layer's hidden state
    (q/k/v, or GPT-2's fused c_attn), ``attn_out`` writes it back. ``mlp_in`` are the MLP's input
    projections (gate first where there is one, then up); ``mlp_out`` is the down projection.
    ``mlp_in_parts`` is how many channel blocks each ``mlp_in`` linear stacks along its output (2 for
    phi3's fused ``gate_up_proj``: rows ``c`` and ``I + c`` belong to channel ``c``).
    ``conv1d`` marks GPT-2 style ``Conv1D`` linears whose weight is stored ``in x out``: code reads
    weights and shapes through ``weight_out_in`` and ``linear_shape``, which ask the entry.
    """

    layers: str
    attn_in: tuple[str, ...]
    attn_out: tuple[str, ...]
    mlp_in: tuple[str, ...]
    mlp_out: str
    conv1d: bool = False
    mlp_in_parts: int = 1
    # Per-layer config lists that must follow the layers when depth changes.
    per_layer_config: tuple[str, ...] = field(default=("layer_types",))
    # Config flags that tie a layer's computation to its position: a moved layer would compute
    # something else, so models with one of them set are refused.
    position_dependent_flags: tuple[str, ...] = ()

    @property
    def attn_linears(self) -> tuple[str, ...]:
        return self.attn_in + self.attn_out

    @property
    def mlp_linears(self) -> tuple[str, ...]:
        return self.mlp_in + (self.mlp_out,)

    def stores_transposed(self, module: nn.Module) -> bool:
        """Whether ``module`` is one of this architecture's ``in x out`` linears (GPT-2's ``Conv1D``)."""
        if not self.conv1d:
            return False
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, Conv1D)


# Each entry: ArchSpec(decoder layers, attention in, attention out, MLP in, MLP out, facts).
_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LIKE = ArchSpec("model.layers", _QKV, ("self_attn.o_proj",), ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj")

REGISTRY: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "opt": ArchSpec("model.decoder.layers", _QKV, ("self_attn.out_proj",), ("fc1",), "fc2"),
    "gpt2": ArchSpec("transformer.h", ("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), "mlp.c_proj", conv1d=True,
                     position_dependent_flags=("scale_attn_by_inverse_layer_idx",)),
    # Pythia: q, k and v fused in one linear (decomposed as one matrix, like GPT-2's c_attn); the
    # parallel residual lives inside the layer, which compression leaves intact.
    "gpt_neox": ArchSpec("gpt_neox.layers", ("attention.query_key_value",), ("attention.dense",),
                         ("mlp.dense_h_to_4h",), "mlp.dense_4h_to_h"),
    # Phi-3: fused qkv_proj, and gate and up fused in one gate_up_proj (gate rows first, then up).
    "phi3": ArchSpec("model.layers", ("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",),
                     "mlp.down_proj", mlp_in_parts=2),
    # Gemma 2 and Gemma 3 (text): sliding and global attention alternate by layer; the config's
    # layer_types list follows the layers when depth changes, so every kept layer keeps its kind.
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
}

#: Architectures refused with a reason (not merely unknown).
REFUSED: dict[str, str] = {
    "gemma3": "gemma3 is the multimodal model: compress its text model (model_type gemma3_text, "
              "Gemma3ForCausalLM) instead",
}


def arch_of(model_or_config) -> ArchSpec:
    """The registry entry for a model or config; a clear error for an unknown architecture."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise UnsupportedModelError(REFUSED[model_type])
    if model_type not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise UnsupportedModelError(f"unsupported architecture {model_type!r}; supported: {known}")
    spec = REGISTRY[model_type]
    for flag in spec.position_dependent_flags:
        if getattr(config, flag, False):
            raise UnsupportedModelError(f"{model_type} with {flag}=True is not supported: its layers compute "
                                        "differently at another depth, which an emulator changes")
    return spec


def get_module(root: nn.Module, dotted: str) -> nn.Module:
    return root.get_submodule(dotted)


def set_module(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model).layers)


def weight_out_in(module: nn.Module, arch: ArchSpec):
    """The weight of one of ``arch``'s linears (or of the low-rank pair replacing it) ``out x in``
    (a view for a transposed one, no copy)."""
    return module.weight.T if arch.stores_transposed(module) else module.weight


def linear_shape(module: nn.Module, arch: ArchSpec) -> tuple[int, int]:
    """``(out, in)`` features of one of ``arch``'s linears (or of the low-rank pair replacing it):
    the order of ``weight_out_in``'s shape, the one convention of the package."""
    if arch.stores_transposed(module):
        n_in, n_out = module.weight.shape
        return n_out, n_in
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return module.out_features, module.in_features
    raise TypeError(f"expected a linear layer, got {type(module).__name__}")


def is_linear(module: nn.Module, arch: ArchSpec) -> bool:
    """An ``nn.Linear`` or one of ``arch``'s own transposed linears."""
    return isinstance(module, nn.Linear) or arch.stores_transposed(module)
