"""KFAC statistics of linear layers from one forward-backward pass over calibration text.

For every tracked linear ``y = W x`` (``W``: out x in) this collects, in float32,

* ``A    = (1/T) sum_t x_t x_t^T``                (in x in),
* ``G    = (1/T) sum_t g_t g_t^T``                (out x out),
* ``grad = (1/N) sum_t g_t x_t^T = dL/dW``        (out x in; skipped with ``gradients=False``),

where the sums run over every non-padding position ``t`` of every calibration sequence (``T``
positions in all), ``N`` is the number of tokens with a loss (shifted labels != -100), ``L`` is the
**mean** causal-LM cross-entropy over all ``N`` calibration loss tokens, and

    g_t = d(sum_s l_s)/d y_t = N * dL/dy_t

is the per-token output gradient: the gradient of the *summed* token losses (one backward of the
summed loss gives it directly, so no rescaling is involved). Hence ``grad`` is exactly the gradient
of the mean calibration loss w.r.t. ``W`` (global mean, not a mean of per-batch means), while
``A`` and ``G`` are averages over the same set of positions, so ``G Delta A`` approximates the
Hessian-vector product of the summed loss per position. Positions without a loss target (the last
position of each sequence) enter ``A`` and contribute zero to ``G``.

GPT-2's ``Conv1D`` stores its weight ``in x out``; the factors returned for it still follow the
``out x in`` convention (``grad`` is ``Conv1D.weight.grad.T``).

Memory stays bounded: model parameters are frozen during collection (no ``.grad``, no weight-gradient
work); gradients are only made to flow from the tracked linears' outputs upwards. To process a model
layer by layer, call ``collect_kfac`` with a subset of modules at a time
(``methods.gradot.collect_and_score(layers_per_pass=...)`` does this and frees each chunk's factors).

Cost (docs/speed.md). On top of the forward-backward floor, every tracked linear costs, per token,
one ``x x^T`` (shared by linears reading the same input), one ``g g^T`` (both symmetric: only the
upper block triangle is computed, about 5/8 of the product, then mirrored) and, unless
``gradients=False``, one ``g x^T`` (as much as its weight gradient). For a Llama layer with hidden
size ``H``, key/value width ``K`` and MLP width ``I`` that is ``3H^2 + I^2`` (A) plus
``3H^2 + 2K^2 + 2I^2`` (G) plus ``2H^2 + 2HK + 3HI`` (grad) multiply-adds, against
``2 (2H^2 + 2HK + 3HI)`` for the layer's own forward and input-gradient backward: the statistics
are inherently about as costly as the pass itself (A and G at 5/8 of that count with the block
triangle). ``gradients=False`` (nothing needs the first-order term when both lambdas are 0) drops
the ``g x^T`` products and the ``grad`` memory. The final normalisation divides the accumulators in
place (no second copy of every factor at the peak), and nothing synchronises with the device per
batch unless a progress bar is shown.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..freezing import requiring_grad
from ..registry import ArchSpec, arch_of, linear_shape


__all__ = ["KFACFactors", "collect_kfac", "damped", "forward_backward_floor"]


@dataclass
class KFACFactors:
    """KFAC statistics of one linear layer (float32, ``W``: out x in convention).

    Attributes:
        A: ``E[x x^T]`` over non-padding positions, ``in x in``. Layers reading the same input
            (q/k/v, gate/up) share one tensor object.
        G: ``E[g g^T]`` over the same positions, ``out x out``; ``g_t`` the per-token output gradient.
        grad: gradient of the mean calibration loss w.r.t. ``W``, ``out x in``; None when collected
            with ``gradients=False``.
        n_tokens: number of positions averaged in ``A`` and ``G`` (the token sample's, when
            ``collect_kfac`` ran with ``token_fraction < 1``).
        n_loss_tokens: number of loss tokens the mean loss (and so ``grad``) is taken over.
    """

    A: Tensor
    G: Tensor
    grad: Tensor | None
    n_tokens: int
    n_loss_tokens: int


def _damp(M: Tensor, delta: float) -> Tensor:
    """``M + delta * mean(diag M) * I``: damping relative to the factor's own scale, so one ``delta``
    means the same in every layer (the factors' magnitudes differ by orders between layers)."""
    return M + (delta * float(M.diagonal().mean())) * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def damped(factors: Mapping[str, KFACFactors], delta: float) -> dict[str, KFACFactors]:
    """Tikhonov-damped copies of ``factors`` (``A`` and ``G`` each plus ``delta`` times its mean
    eigenvalue; ``grad`` untouched). A tensor shared by several linears (q/k/v's ``A``) is damped once
    and stays shared. ``delta == 0`` returns the factors themselves. Pure: the inputs are not changed."""
    if delta < 0 or not math.isfinite(delta):
        raise ValueError(f"damping must be a finite number >= 0, got {delta}")
    if delta == 0:
        return dict(factors)
    done: dict[int, Tensor] = {}

    def once(M: Tensor) -> Tensor:
        if id(M) not in done:
            done[id(M)] = _damp(M, delta)
        return done[id(M)]

    return {name: replace(f, A=once(f.A), G=once(f.G)) for name, f in factors.items()}


# --------------------------------------------------------------------------------------------
# batches and loss
# --------------------------------------------------------------------------------------------


def _input_device(model: nn.Module) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device  # type: ignore[operator,union-attr]
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _prepare_batch(batch: Any, device: torch.device) -> tuple[Tensor, Tensor | None, Tensor]:
    """``(input_ids, attention_mask or None, labels)`` on ``device``, each ``B x T``."""
    if isinstance(batch, Tensor):
        ids, mask, labels = batch, None, None
    elif isinstance(batch, Mapping):
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    else:
        raise TypeError(f"a batch must be a LongTensor or a dict with input_ids, got {type(batch).__name__}")

    def two_d(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        t = torch.as_tensor(t)
        return (t.unsqueeze(0) if t.dim() == 1 else t).to(device)

    ids, mask, labels = two_d(ids), two_d(mask), two_d(labels)
    if labels is None:
        labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _loss_sum(model: nn.Module, ids: Tensor, mask: Tensor | None, labels: Tensor) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy (float32) and the number of loss tokens."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    shift_labels = labels[:, 1:]
    if mask is not None:
        # A padding position predicts nothing (with left padding it would "predict" the first real
        # token): this keeps every padding position's output gradient exactly zero, so dropping
        # padding from the statistics loses nothing and grad stays the mean loss's gradient.
        shift_labels = shift_labels.masked_fill(mask[:, :-1] == 0, -100)
    shift_labels = shift_labels.reshape(-1)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        shift_labels,
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((shift_labels != -100).sum())


def _clear_grad_after_accumulate(t: Tensor) -> None:
    # Leaves we create only exist to start the backward; never keep their .grad around.
    t.register_post_accumulate_grad_hook(lambda leaf: setattr(leaf, "grad", None))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# model state
# --------------------------------------------------------------------------------------------


@contextmanager
def _frozen_eval(model: nn.Module):
    """Eval mode and frozen parameters for the duration; restores both exactly afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with requiring_grad(model, []):
            model.eval()
            yield
    finally:
        for m, t in modes:
            m.training = t


def _embedding_requires_grad_hook(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
    # Gradients must reach (and flow through) every layer even though no parameter requires grad;
    # reentrant checkpointing in particular needs its inputs to require grad.
    if torch.is_grad_enabled() and isinstance(output, Tensor) and not output.requires_grad:
        output = output.detach().requires_grad_(True)
        _clear_grad_after_accumulate(output)
        return output
    return None


@contextmanager
def _checkpointing(model: nn.Module):
    """Activation checkpointing for the duration (reentrant unless the caller already set it up).

    Reentrant recomputation keeps nothing of the forward but each layer's input; the statistics
    of a layer are then computed from its recomputation in the backward pass (see ``_Collector``).
    Transformers only checkpoints modules in training mode, so the ``training`` flag is set on the
    checkpointing modules themselves (not their children): dropout stays off.
    """
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    if not flagged:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    already = any(m.gradient_checkpointing for m in flagged)
    had_input_hooks = bool(getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None))
    if not already:
        kwargs = {"use_reentrant": True}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False):
            m.training = True  # restored by _frozen_eval
    handle = model.get_input_embeddings().register_forward_hook(_embedding_requires_grad_hook)
    try:
        yield
    finally:
        handle.remove()
        if not already:
            if hasattr(model, "activation_checkpointing_disable"):
                model.activation_checkpointing_disable()
            else:
                model.gradient_checkpointing_disable()
            if not had_input_hooks and hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()


# --------------------------------------------------------------------------------------------
# the collector
# --------------------------------------------------------------------------------------------


class _ASum:
    """Running sum of ``x x^T`` (possibly shared by several modules reading the same input)."""

    __slots__ = ("sum", "n", "n_in", "device", "products")

    def __init__(self, n_in: int, device: torch.device, products: torch.dtype = torch.float32):
        self.sum: Tensor | None = None  # allocated by the first product (no zero fill)
        self.n = 0
        self.n_in, self.device, self.products = n_in, device, products

    def add(self, rows: Tensor) -> None:
        self.sum = _accumulate_gram(self.sum, rows, self.products)
        self.n += rows.shape[0]

    def total(self) -> Tensor:
        """The full symmetric sum (call once, at the end)."""
        if self.sum is None:
            return torch.zeros(self.n_in, self.n_in, dtype=torch.float32, device=self.device)
        return _symmetrize_(self.sum)


def _accumulate(acc: Tensor | None, a: Tensor, b: Tensor) -> Tensor:
    """``acc + a @ b`` in place; the first call allocates ``acc`` from the product itself."""
    if acc is None:
        return torch.mm(a, b)
    return acc.addmm_(a, b)


#: Column blocks of a Gram matrix ``X^T X`` are at least this wide (narrower ones lose GEMM speed).
_GRAM_BLOCK = 128
_GRAM_MAX_BLOCKS = 4


def _gram_block_width(n: int) -> int:
    """Width of the column blocks a Gram matrix of ``n`` columns is accumulated in (``n``: one block)."""
    return -(-n // max(1, min(_GRAM_MAX_BLOCKS, n // _GRAM_BLOCK)))


def _accumulate_gram(acc: Tensor | None, rows: Tensor, products: torch.dtype = torch.float32) -> Tensor:
    """Add ``rows^T rows`` to the upper block triangle of ``acc`` (``_symmetrize_`` completes it).

    The product is symmetric, so only the blocks on and above the diagonal are computed: with
    ``b`` column blocks that is ``(b + 1) / 2b`` of the multiply-adds (5/8 for 4 blocks; measured
    0.6-0.7x the time of the full product on CPU for 576-2560 columns). The first call allocates.
    With ``products=torch.bfloat16`` each batch's product is computed from bfloat16 copies of the
    rows (half the time where the hardware has bfloat16 matrix units) and added to the float32 sum.
    """
    if products != torch.float32:
        return _accumulate_gram_low(acc, rows, products)
    n = rows.shape[1]
    width = _gram_block_width(n)
    if acc is None:
        if width == n:
            return torch.mm(rows.T, rows)
        acc = torch.zeros(n, n, dtype=rows.dtype, device=rows.device)
    if width == n:
        return acc.addmm_(rows.T, rows)
    for start in range(0, n, width):
        stop = min(n, start + width)
        # rows start..stop of the result, from the diagonal block to the right edge
        acc[start:stop, start:].addmm_(rows[:, start:stop].T, rows[:, start:])
    return acc


def _accumulate_gram_low(acc: Tensor | None, rows: Tensor, products: torch.dtype) -> Tensor:
    """``_accumulate_gram`` with the products in ``products`` precision, the running sum in float32."""
    n = rows.shape[1]
    low = rows.to(products)
    if acc is None:
        acc = torch.zeros(n, n, dtype=torch.float32, device=rows.device)
    width = _gram_block_width(n)
    for start in range(0, n, width):
        stop = min(n, start + width)
        acc[start:stop, start:].add_(torch.mm(low[:, start:stop].T, low[:, start:]))
    return acc


def _symmetrize_(acc: Tensor) -> Tensor:
    """Mirror the upper triangle of ``acc`` into the lower one, in place."""
    acc.triu_()
    return acc.add_(acc.triu(1).T)


class _Stats:
    __slots__ = ("name", "n_out", "n_in", "a", "G", "grad", "n_tokens")

    def __init__(self, name: str, n_out: int, n_in: int):
        self.name, self.n_out, self.n_in = name, n_out, n_in
        self.a: _ASum | None = None
        self.G: Tensor | None = None
        self.grad: Tensor | None = None
        self.n_tokens = 0


class _Collector:
    """Forward hooks that accumulate ``A`` and attach gradient hooks that accumulate ``G``, ``grad``.

    Double counting under activation checkpointing is avoided by construction:

    * ``A`` is only accumulated outside ``loss.backward()``; hooks that fire while recomputing a
      checkpointed layer inside the backward skip it.
    * ``G``/``grad`` come from gradient hooks on the module output, registered whenever grad mode is
      on, each paired with *its own* input ``x``. Exactly one copy of each output is on the graph the
      backward traverses: without checkpointing the forward's; with reentrant checkpointing the
      recomputation's (the forward ran under ``no_grad``, so nothing was registered then); with
      non-reentrant checkpointing the forward's (the recomputed graph only supplies saved tensors
      and is never traversed, so hooks registered on it never fire).

    Shared inputs: a module called with the very tensor (same data pointer, shape, strides, dtype)
    as the previously called tracked module adopts that module's ``A`` accumulator (the grouping is
    fixed on the first batch and checked for consistency at the end) and does not add it again. The previous input is held until the next tracked call, so its
    address cannot be reused by another tensor meanwhile.
    """

    def __init__(self, modules: Mapping[str, nn.Module], shared_inputs: bool, gradients: bool, arch: ArchSpec,
                 products: torch.dtype = torch.float32, token_fraction: float = 1.0, seed: int = 0):
        self.shared_inputs = shared_inputs
        self.gradients = gradients
        self.products = products
        self.token_fraction = token_fraction
        self.generator = torch.Generator().manual_seed(seed)  # CPU generator: the same sample on any device
        self.stats = {name: _Stats(name, *linear_shape(m, arch)) for name, m in modules.items()}
        self.mask: Tensor | None = None  # flat boolean mask of the current batch's real tokens
        self.n_real = 0  # number of True entries in mask
        self.sample: Tensor | None = None  # flat boolean mask of the positions in the A and G products
        self.n_sample = 0
        self.in_backward = False
        self.last: tuple[tuple, Tensor, _ASum] | None = None
        self.n_loss_tokens = 0

    # -- helpers ------------------------------------------------------------------------------

    def rows(self, t: Tensor, sampled: bool = False) -> Tensor:
        """``t`` as float32 ``tokens x features``, padding positions dropped (``sampled``: only the
        positions of the products' token sample)."""
        t2 = t.detach().reshape(-1, t.shape[-1])
        mask = self.sample if sampled and self.sample is not None else self.mask
        if mask is not None:
            if t2.shape[0] != mask.numel():
                raise RuntimeError(
                    f"a tracked module saw {t2.shape[0]} positions but the batch has {mask.numel()}; "
                    "cannot apply the attention mask"
                )
            t2 = t2[mask]
        return t2.float()

    def n_rows(self, t: Tensor, sampled: bool = False) -> int:
        """Number of positions ``rows(t, sampled)`` would return, without computing it."""
        if sampled and self.sample is not None:
            return self.n_sample
        return self.n_real if self.mask is not None else t.numel() // t.shape[-1]

    def begin_batch(self, attention_mask: Tensor | None, n_positions: int = 0,
                    device: torch.device | None = None) -> None:
        self.mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        self.n_real = 0 if self.mask is None else int(self.mask.sum())
        self.sample, self.n_sample = None, 0
        if self.token_fraction < 1.0 and n_positions:
            self._draw_sample(n_positions, device)
        self.last = None

    def _draw_sample(self, n_positions: int, device: torch.device | None) -> None:
        """A uniform random subset (``token_fraction`` of the batch's real positions, at least one)
        for the ``A`` and ``G`` products; ``grad`` keeps every position."""
        real = (self.mask.nonzero().squeeze(1).cpu() if self.mask is not None
                else torch.arange(n_positions))
        k = max(1, round(self.token_fraction * real.numel())) if real.numel() else 0
        chosen = real[torch.randperm(real.numel(), generator=self.generator)[:k]]
        sample = torch.zeros(n_positions, dtype=torch.bool)
        sample[chosen] = True
        self.sample, self.n_sample = sample.to(device or "cpu"), k

    def end_forward(self) -> None:
        self.last = None

    @contextmanager
    def backward_phase(self):
        self.in_backward = True
        try:
            yield
        finally:
            self.in_backward = False

    # -- hooks --------------------------------------------------------------------------------

    def forward_hook(self, name: str, module: nn.Module, inputs: tuple, output: Any) -> Any:
        if not inputs or not isinstance(inputs[0], Tensor):
            raise RuntimeError(f"{name}: expected the input tensor as the first positional argument")
        x = inputs[0]
        st = self.stats[name]
        if x.shape[-1] != st.n_in:
            raise RuntimeError(f"{name}: input has {x.shape[-1]} features, weight expects {st.n_in}")
        if not self.in_backward:  # not a checkpoint recomputation
            with torch.no_grad():
                self._accumulate_a(st, x)
        if torch.is_grad_enabled() and isinstance(output, Tensor):
            return self._tap_output(st, x, output)
        return None

    def _accumulate_a(self, st: _Stats, x: Tensor) -> None:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)
        same_as_last = self.shared_inputs and self.last is not None and self.last[0] == key
        if st.a is None:
            st.a = self.last[2] if same_as_last else _ASum(st.n_in, x.device, self.products)  # type: ignore[index]
        st.n_tokens += self.n_rows(x, sampled=True)
        if not (same_as_last and self.last[2] is st.a):  # type: ignore[index]
            st.a.add(self.rows(x, sampled=True))
        self.last = (key, x, st.a)

    def _tap_output(self, st: _Stats, x: Tensor, y: Tensor) -> Tensor | None:
        def on_grad(g: Tensor) -> None:
            with torch.no_grad():
                self._accumulate_g(st, x, g)

        if y.requires_grad:
            y.register_hook(lambda g: on_grad(g))  # returns None: gradient unchanged
            return None
        # Nothing below this module requires grad (parameters are frozen): start the graph here,
        # so the backward stops at the lowest tracked layer instead of running down to the embedding.
        # (Architectures that modify a linear's output in place would reject this leaf; none of the
        # supported ones do.)
        leaf = y.detach().requires_grad_(True)

        def post(t: Tensor) -> None:
            on_grad(t.grad)  # type: ignore[arg-type]
            t.grad = None

        leaf.register_post_accumulate_grad_hook(post)
        return leaf

    def _accumulate_g(self, st: _Stats, x: Tensor, g: Tensor) -> None:
        g2 = self.rows(g, sampled=True)
        st.G = _accumulate_gram(st.G, g2, self.products)
        if self.gradients:
            g_all = g2 if self.sample is None else self.rows(g)
            st.grad = _accumulate(st.grad, g_all.T, self.rows(x))

    # -- result -------------------------------------------------------------------------------

    def finalize(self) -> dict[str, KFACFactors]:
        never = [n for n, st in self.stats.items() if st.n_tokens == 0]
        if never:
            raise RuntimeError(f"these modules never saw a token during collection: {never}")
        A_of: dict[int, Tensor] = {}
        out: dict[str, KFACFactors] = {}
        n_loss = self.n_loss_tokens
        for name, st in self.stats.items():
            a = st.a
            assert a is not None
            if a.n != st.n_tokens:
                raise RuntimeError(
                    f"{name}: shared-input grouping changed between batches (A saw {a.n} tokens, the module "
                    f"{st.n_tokens}); rerun with shared_inputs=False"
                )
            if id(a) not in A_of:  # one tensor object per shared accumulator
                A_of[id(a)] = a.total().div_(max(a.n, 1))
            dev = a.device
            G = _symmetrize_(st.G) if st.G is not None else torch.zeros(st.n_out, st.n_out, device=dev)
            grad = None
            if self.gradients:
                grad = st.grad if st.grad is not None else torch.zeros(st.n_out, st.n_in, device=dev)
                grad = grad.div_(max(n_loss, 1))
            st.G = st.grad = None  # the accumulators become the results (divided in place)
            out[name] = KFACFactors(
                A=A_of[id(a)],
                G=G.div_(st.n_tokens),
                grad=grad,
                n_tokens=st.n_tokens,
                n_loss_tokens=n_loss,
            )
        return out


def _progress(batches: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return batches
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, total=len(batches) if hasattr(batches, "__len__") else None)


def collect_kfac(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, Tensor] | Tensor],
    *,
    shared_inputs: bool = True,
    progress: bool = True,
    gradient_checkpointing: bool = False,
    gradients: bool = True,
    products: torch.dtype = torch.float32,
    token_fraction: float = 1.0,
    seed: int = 0,
) -> dict[str, KFACFactors]:
    """Collect KFAC factors of ``modules`` over ``batches`` with the model's causal-LM loss.

    See the module docstring for the exact definitions and scaling of ``A``, ``G`` and ``grad``.

    Args:
        model: a Hugging Face causal LM (returns ``.logits``; accepts ``input_ids``,
            ``attention_mask``, ``use_cache``).
        modules: name -> ``nn.Linear`` or transformers ``Conv1D`` inside ``model``.
        batches: ``B x T`` (or ``T``) ``LongTensor`` of input ids, or dicts with ``input_ids`` and
            optionally ``attention_mask`` (0 = padding: excluded from every statistic) and
            ``labels`` (default: ``input_ids`` with padding set to -100; shifted internally; a
            token is only a loss token when the position predicting it is not padding).
        shared_inputs: compute ``A`` once for linears reading the same input tensor (q/k/v,
            gate/up) and share the tensor object between their entries.
        progress: show a tqdm progress bar over the batches.
        gradient_checkpointing: run with activation checkpointing (reentrant, unless the model
            already has checkpointing enabled, which is then used as is); gives the same factors.
        gradients: also accumulate ``grad`` (needed only for the first-order GCS term, i.e. a
            nonzero lambda); with False every ``KFACFactors.grad`` is None and the ``g x^T``
            products (as costly as weight gradients) are skipped.
        products: precision of the ``A`` and ``G`` products (``torch.bfloat16``: each batch's
            product from bfloat16 copies of the inputs and output gradients, summed in float32;
            about half the time on hardware with bfloat16 matrix units, relative error of a
            factor ~1e-3). ``grad`` is always float32.
        token_fraction: share of each batch's real positions whose ``x x^T`` and ``g g^T`` enter
            ``A`` and ``G`` (a uniform random sample drawn with ``seed``; 1.0: every position, exact).
            The pass itself is unchanged and ``grad`` always uses every position; the products cost
            about ``token_fraction`` of their full time, and ``A``, ``G`` become averages over the
            sample (``KFACFactors.n_tokens`` counts it).
        seed: seed of the token sample (used only with ``token_fraction < 1``).

    Returns:
        name -> ``KFACFactors`` (float32, on the device of each module's inputs).

    The model's parameters are frozen and it runs in eval mode during collection (no dropout, no
    ``.grad`` on any parameter); its ``requires_grad`` flags, training modes and checkpointing
    setting are restored afterwards.
    """
    arch = arch_of(model)
    for m in modules.values():
        linear_shape(m, arch)  # type check with a clear error
    if products not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"products must be torch.float32, torch.bfloat16 or torch.float16, not {products}")
    if not 0.0 < token_fraction <= 1.0:
        raise ValueError(f"token_fraction must be in (0, 1], got {token_fraction}")
    collector = _Collector(modules, shared_inputs, gradients, arch, products, token_fraction, seed)
    device = _input_device(model)
    with _frozen_eval(model):
        ckpt = _checkpointing(model) if gradient_checkpointing else nullcontext()
        with ckpt:
            _run_batches(model, modules, batches, collector, device, progress)
    return collector.finalize()


def _run_batches(model: nn.Module, modules: Mapping[str, nn.Module], batches: Iterable, collector: _Collector,
                 device: torch.device, progress: bool) -> None:
    """Forward and backward every batch with ``collector``'s hooks on ``modules`` (removed after)."""
    handles = []
    try:
        for name, m in modules.items():
            handles.append(m.register_forward_hook(partial(collector.forward_hook, name)))
        it = _progress(batches, progress, "KFAC statistics")
        for batch in it:
            ids, mask, labels = _prepare_batch(batch, device)
            collector.begin_batch(mask, ids.numel(), ids.device)
            loss, n_loss = _loss_sum(model, ids, mask, labels)
            collector.end_forward()
            if n_loss > 0 and loss.requires_grad:
                with collector.backward_phase():
                    loss.backward()
            collector.n_loss_tokens += n_loss
            if progress and hasattr(it, "set_postfix") and n_loss > 0:
                it.set_postfix(loss=f"{loss.item() / n_loss:.3f}")
            del loss
    finally:
        for h in handles:
            h.remove()
        collector.begin_batch(None)


def forward_backward_floor(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor] | Tensor],
    *,
    gradient_checkpointing: bool = False,
) -> float:
    """Seconds one plain forward+backward over ``batches`` takes: the floor for ``collect_kfac``.

    Same model state as ``collect_kfac`` (eval mode, frozen parameters, the same summed causal-LM
    loss) but no hooks: the backward runs from the loss down to the embedding output and computes no
    weight gradients (``collect_kfac`` does not need them either). Only the forward and backward
    themselves are timed (batches are moved to the device first; CUDA is synchronised).
    """
    device = _input_device(model)
    total = 0.0
    with _frozen_eval(model):
        ckpt = _checkpointing(model) if gradient_checkpointing else nullcontext()
        with ckpt:
            handle = None
            if not gradient_checkpointing:  # _checkpointing installs the same hook itself
                handle = model.get_input_embeddings().register_forward_hook(_embedding_requires_grad_hook)
            try:
                for batch in batches:
                    ids, mask, labels = _prepare_batch(batch, device)
                    _sync(device)
                    t0 = time.perf_counter()
                    loss, n_loss = _loss_sum(model, ids, mask, labels)
                    if n_loss > 0 and loss.requires_grad:
                        loss.backward()
                    _sync(device)
                    total += time.perf_counter() - t0
                    del loss
            finally:
                if handle is not None:
                    handle.remove()
    return total
