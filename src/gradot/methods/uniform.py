"""OT† uniform layer drop: keep evenly spaced whole middle layers (offsite-tuning's baseline).

Selection is pure (numbers in, indices out); ``uniform_emulator`` hands the indices to
``emulator.assemble``. Needs no calibration text.
"""

from __future__ import annotations

from torch import nn

from ..emulator import Emulator, assemble
from ..offload import plain_copy
from ..registry import decoder_layers
from ..split import Split
from .base import MethodConfig, SimpleMethod


def layers_to_keep(n_middle: int, keep: float) -> int:
    """Number of whole middle layers that best matches the keep fraction (at least one)."""
    return max(1, min(n_middle, round(keep * n_middle)))


def uniform_indices(n: int, m: int) -> list[int]:
    """offsite-tuning's ``uniform_choose_layers``: indices ``round(i(n-1)/(m-1))``, i = 0..m-1."""
    if not 1 <= m <= n:
        raise ValueError(f"cannot keep {m} of {n} layers")
    if m == 1:
        return [(n - 1) // 2]
    return [round(i * (n - 1) / (m - 1)) for i in range(m)]


def uniform_emulator(model: nn.Module, split: Split, keep: float) -> Emulator:
    n = len(split.middle)
    chosen = [split.middle[i] for i in uniform_indices(n, layers_to_keep(n, keep))]
    layers = decoder_layers(model)
    middle = [plain_copy(layers[i]) for i in chosen]
    return assemble(model, split, middle, chosen, [None] * len(chosen), method="uniform", keep=keep)


#: OT† has no setting but ``keep``.
METHOD = SimpleMethod("uniform", "OT† layer drop", MethodConfig, False,
                      lambda model, split, config, calibration: uniform_emulator(model, split, config.keep))
