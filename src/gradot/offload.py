"""Models whose weights accelerate offloads (``device_map`` with "cpu"/"disk" entries).

Such a model keeps offloaded weights on the meta device and loads them around each forward pass
(accelerate's ``AlignDevicesHook``). Compression also reads weights outside the forward pass
(scoring, copying the kept layers, the base fingerprint); these helpers load them for exactly that
block and give copies that are plain modules (real tensors, no hooks), so the emulator never depends
on the original model's offload state. On a model without offloaded weights both are no-ops
(``plain_copy`` is then ``copy.deepcopy``).
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager

from torch import nn


def _offloaded_modules(module: nn.Module) -> list[nn.Module]:
    from accelerate.utils import has_offloaded_params

    return [m for m in module.modules() if has_offloaded_params(m)]


@contextmanager
def onloaded(*modules: nn.Module):
    """Within the block, the offloaded weights of ``modules`` are real tensors on their execution
    device; afterwards they are offloaded again."""
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for module in modules:
            for m in _offloaded_modules(module):
                stack.enter_context(align_module_device(m))
        yield


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy with real weights and no accelerate hooks (for offloaded or dispatched models)."""
    from accelerate.hooks import remove_hook_from_module

    hooked = any(hasattr(m, "_hf_hook") for m in module.modules())
    if not hooked:
        return copy.deepcopy(module)
    with onloaded(module):
        twin = copy.deepcopy(module)
    remove_hook_from_module(twin, recurse=True)
    return twin
