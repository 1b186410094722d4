"""What a data owner holding an emulator can learn of the original model's middle block.

Pure measurement functions (original model + emulator in, numbers out; nothing is modified). For
every weight matrix ``W`` of every original middle layer the emulator either ships nothing (the
layer was dropped, or it is a non-representative member of a CRaSh cluster), the matrix itself
(kept or shared layers), a rank-r approximation (DRD: the dense product of the two factors), or
some of its rows / columns (SCP: kept MLP channels, the pruned ones are zero). Two attacker
reconstructions are scored with the relative Frobenius error ``||W - Ŵ|| / ||W||``:

* ``own``: what the emulator ships for that very layer (nothing -> ``Ŵ = 0``, error 1);
* ``best``: the best of ``own``, zero, and every same-role, same-shape matrix the emulator ships
  for any other layer (adapter layers included: they ship in the clear). The choice is made with
  the original in hand, so it is an optimistic bound on an attacker who must guess.

Reconstructions use only the emulator's modules; the original is used to score them and to place
the kept rows of a channel-pruned matrix (the manifest does not record which channels survived; a
kept row equals exactly one original row, so nearest-row matching recovers the index).

Trained emulators (``distill``, ``scaleot``) are measured by the same rules; the manifest's slots say
which original layer each emulator layer came from (``source``), and that is the layer it is scored
against:

* A *distilled* middle layer is a trained copy of its source layer: its matrices ship at full shape
  (``dense``) and are the attacker's ``own`` reconstruction of that layer, with a small error that
  grows with training (0 before any step). Its entries are not bit-exact, so they do not count in
  ``exact``; a matrix whose shipped entries are not all bit-exact is reported ``modified``.
* A ScaleOT *harmonizer* stands in for a span of original layers (``replaces``). It was cut from the
  span's first layer (rank-reduced attention, a few MLP channels, output projections zeroed) and then
  trained, so it is scored as that first layer's ``own`` reconstruction (low-rank and pruned, like any
  compressed layer); the span's other layers ship nothing (``own``: Ŵ = 0, error 1; status
  ``replaced``), and ``best`` tries the harmonizer's same-shape matrices for them like any other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..registry import ArchSpec, arch_of, decoder_layers, get_module, weight_out_in
from ..surgery import LowRankLinear


@dataclass
class Reconstruction:
    """An attacker's estimate ``value`` of an original tensor, and which entries were shipped."""

    value: torch.Tensor  # same shape as the original (out x in for matrices)
    shipped: torch.Tensor  # bool mask: entries the emulator carries (placed rows/columns, or all)
    kind: str  # "dense" | "lowrank" | "pruned" | "none"


@dataclass
class MatrixReport:
    layer: int  # original layer index
    name: str  # linear name inside the layer
    shape: list[int]  # out x in
    kind: str  # how the emulator ships it: dense | lowrank | pruned | none
    own_error: float  # relative Frobenius error of the layer's own reconstruction
    best_error: float  # ... of the best reconstruction (own, zero, or another layer's matrix)
    best_source: str  # "own", "zero" or "layer N" (the emulator layer whose matrix was best)
    norm: float  # ||W||_F
    own_sq_error: float  # ||W - Ŵ_own||_F^2 (for block-level aggregation)
    best_sq_error: float
    # Of the entries the emulator ships as such (dense, or kept rows/columns), the share that is
    # bit-exact: 1 for a copied or pruned matrix, about 0 for a trained one; None if none ship as such
    # (nothing, or a low-rank product).
    shipped_exact: float | None = None

    @property
    def modified(self) -> bool:
        """Shipped entries that are not the original's bits (a trained or re-cast matrix)."""
        return self.shipped_exact is not None and self.shipped_exact < 1


@dataclass
class MethodPrivacy:
    matrices: list[MatrixReport] = field(default_factory=list)
    middle_params: int = 0  # parameters of the original middle block
    exact_params: int = 0  # of those, shipped bit-exactly in the emulator
    layer_status: dict[int, str] = field(default_factory=dict)  # original layer -> what ships of it

    @property
    def mean_own_error(self) -> float:
        return sum(m.own_error for m in self.matrices) / len(self.matrices)

    @property
    def mean_best_error(self) -> float:
        return sum(m.best_error for m in self.matrices) / len(self.matrices)

    @property
    def block_own_error(self) -> float:
        """Relative Frobenius error over all middle matrices at once (large matrices weigh more)."""
        return (sum(m.own_sq_error for m in self.matrices) / sum(m.norm ** 2 for m in self.matrices)) ** 0.5

    @property
    def block_best_error(self) -> float:
        return (sum(m.best_sq_error for m in self.matrices) / sum(m.norm ** 2 for m in self.matrices)) ** 0.5

    @property
    def exact_fraction(self) -> float:
        return self.exact_params / self.middle_params if self.middle_params else 0.0

    def summary(self) -> dict:
        return {
            "matrices": len(self.matrices),
            "mean_own_error": self.mean_own_error,
            "mean_best_error": self.mean_best_error,
            "block_own_error": self.block_own_error,
            "block_best_error": self.block_best_error,
            "middle_params": self.middle_params,
            "exact_params": self.exact_params,
            "exact_fraction": self.exact_fraction,
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "layer_status": {str(k): v for k, v in self.layer_status.items()},
                "matrices": [asdict(m) for m in self.matrices]}


def relative_error(W: torch.Tensor, W_hat: torch.Tensor) -> float:
    """``||W - Ŵ||_F / ||W||_F`` in float64 (1.0 for ``Ŵ = 0``; 0 for an exact copy)."""
    W, W_hat = W.detach().double(), W_hat.detach().double()
    norm = W.norm()
    if norm == 0:
        return 0.0 if W_hat.norm() == 0 else float("inf")
    return float((W - W_hat).norm() / norm)


def match_rows(kept: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """For each row of ``kept``, the index of the nearest row of ``original`` (exact copies: distance 0)."""
    kept, original = kept.detach().double(), original.detach().double()
    return torch.cdist(kept, original).argmin(dim=1)


def place(W: torch.Tensor, shipped: torch.Tensor) -> Reconstruction:
    """Reconstruct ``W`` (out x in) from a shipped matrix of the same or a channel-sliced shape.

    Same shape: used as is. Fewer rows (pruned out-projection) or fewer columns (pruned
    in-projection): each kept row/column is placed at the index of the original row/column it
    matches; the rest are zero.
    """
    W, shipped = W.detach(), shipped.detach().to(W.dtype)
    if shipped.shape == W.shape:
        return Reconstruction(shipped.clone(), torch.ones_like(W, dtype=torch.bool), "dense")
    value = torch.zeros_like(W)
    mask = torch.zeros_like(W, dtype=torch.bool)
    if shipped.shape[1] == W.shape[1] and shipped.shape[0] <= W.shape[0]:
        idx = match_rows(shipped, W)
        value[idx] = shipped
        mask[idx] = True
    elif shipped.shape[0] == W.shape[0] and shipped.shape[1] <= W.shape[1]:
        idx = match_rows(shipped.T, W.T)
        value[:, idx] = shipped
        mask[:, idx] = True
    else:
        raise ValueError(f"cannot place a {list(shipped.shape)} matrix into {list(W.shape)}")
    return Reconstruction(value, mask, "pruned")


def reconstruct_matrix(W: torch.Tensor, module: nn.Module | None, arch: ArchSpec) -> Reconstruction:
    """The attacker's estimate of ``W`` (out x in) from the emulator's module (None: nothing ships)."""
    if module is None:
        return Reconstruction(torch.zeros_like(W), torch.zeros_like(W, dtype=torch.bool), "none")
    if isinstance(module, LowRankLinear):
        rec = place(W, module.weight.detach())
        # A low-rank product is an approximation: no entry is shipped as such.
        return Reconstruction(rec.value, torch.zeros_like(rec.shipped), "lowrank")
    return place(W, weight_out_in(module, arch))


def exact_count(original: torch.Tensor, rec: Reconstruction) -> int:
    """Entries of ``original`` the emulator ships bit-exactly."""
    return int(((rec.value == original.detach().to(rec.value.dtype)) & rec.shipped).sum())


def _owner_positions(manifest: dict) -> dict[int, int]:
    """Original layer index -> emulator position that stores its weights (shared positions resolve
    to the position whose weights they re-use)."""
    out = {}
    for pos, slot in enumerate(manifest["slots"]):
        owner = slot["shares"] if slot.get("shares") is not None else pos
        out.setdefault(slot["source"], owner)
    return out


def _replaced_layers(manifest: dict) -> dict[int, int]:
    """Original layer -> its harmonizer's source, for every layer a harmonizer stands in for (its source
    included)."""
    return {i: slot["source"] for slot in manifest["slots"] for i in (slot.get("replaces") or [])}


def _bias_reconstruction(orig_module: nn.Module, emu_module: nn.Module | None,
                         weight_rec: Reconstruction) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(value, shipped mask) for the original linear's bias (None if it has none)."""
    bias = getattr(orig_module, "bias", None)
    if bias is None:
        return None
    bias = bias.detach()
    if emu_module is None:
        return torch.zeros_like(bias), torch.zeros_like(bias, dtype=torch.bool)
    shipped = emu_module.up.bias if isinstance(emu_module, LowRankLinear) else emu_module.bias
    if shipped is None:
        return torch.zeros_like(bias), torch.zeros_like(bias, dtype=torch.bool)
    shipped = shipped.detach().to(bias.dtype)
    if shipped.shape == bias.shape:
        return shipped.clone(), torch.ones_like(bias, dtype=torch.bool)
    # Pruned out-projection: the bias follows the kept rows.
    rows = weight_rec.shipped.any(dim=1)
    value, mask = torch.zeros_like(bias), torch.zeros_like(bias, dtype=torch.bool)
    value[rows], mask[rows] = shipped, True
    return value, mask


@torch.no_grad()
def measure(original: nn.Module, emulator_model: nn.Module, manifest: dict, middle: list[int]) -> MethodPrivacy:
    """Score what ``emulator_model`` (with its ``manifest``) reveals of ``original``'s middle layers."""
    arch = arch_of(original)
    linears = list(arch.attn_linears + arch.mlp_linears)
    orig_layers = decoder_layers(original)
    emu_layers = decoder_layers(emulator_model)
    owners = _owner_positions(manifest)
    replaced = _replaced_layers(manifest)
    # Every matrix the emulator ships, per linear name: (emulator position, dense out x in product).
    stored = sorted(set(owners.values()) | {p for p, s in enumerate(manifest["slots"]) if s.get("shares") is None})
    candidates: dict[str, list[tuple[int, torch.Tensor]]] = {n: [] for n in linears}
    for pos in stored:
        for n in linears:
            m = get_module(emu_layers[pos], n)
            candidates[n].append((pos, weight_out_in(m, arch).detach()))

    report = MethodPrivacy()
    for i in middle:
        layer = orig_layers[i]
        pos = owners.get(i)
        emu_layer = emu_layers[pos] if pos is not None else None
        kinds = set()
        handled: set[str] = set()
        for n in linears:
            orig_module = get_module(layer, n)
            W = weight_out_in(orig_module, arch).detach()
            emu_module = get_module(emu_layer, n) if emu_layer is not None else None
            rec = reconstruct_matrix(W, emu_module, arch)
            kinds.add(rec.kind)
            own_sq = float((W.double() - rec.value.double()).norm() ** 2)
            norm = float(W.double().norm())
            best_sq, best_source = own_sq, "own"
            if norm ** 2 < best_sq:
                best_sq, best_source = norm ** 2, "zero"
            for cpos, C in candidates[n]:
                if cpos == pos or C.shape != W.shape:
                    continue
                sq = float((W.double() - C.double()).norm() ** 2)
                if sq < best_sq:
                    best_sq, best_source = sq, f"layer {manifest['slots'][cpos]['source']}"
            report.matrices.append(MatrixReport(
                layer=i, name=n, shape=list(W.shape), kind=rec.kind,
                own_error=(own_sq ** 0.5) / norm if norm else 0.0,
                best_error=(best_sq ** 0.5) / norm if norm else 0.0,
                best_source=best_source, norm=norm, own_sq_error=own_sq, best_sq_error=best_sq,
            ))
            # Exactly shipped parameters: the weight (in its stored convention) and its bias.
            exact = exact_count(W, rec)
            n_shipped = int(rec.shipped.sum())
            report.matrices[-1].shipped_exact = exact / n_shipped if n_shipped else None
            report.exact_params += exact
            handled.add(f"{n}.weight")
            b = _bias_reconstruction(orig_module, emu_module, rec)
            if b is not None:
                value, mask = b
                report.exact_params += int(((value == orig_module.bias.detach()) & mask).sum())
                handled.add(f"{n}.bias")
        # Everything else in the layer (norms): shipped exactly if the emulator layer has it unchanged.
        emu_params = dict(emu_layer.named_parameters()) if emu_layer is not None else {}
        for name, p in layer.named_parameters():
            report.middle_params += p.numel()
            if name in handled:
                continue
            q = emu_params.get(name)
            if q is not None and q.shape == p.shape:
                report.exact_params += int((q.detach() == p.detach()).sum())
        mine = [m for m in report.matrices if m.layer == i]
        if emu_layer is None:
            status = "replaced" if i in replaced else "nothing"
        elif replaced.get(i) == i:
            status = "harmonizer"
        else:
            shared = sum(1 for s in manifest["slots"] if s["source"] == i) > 1
            parts = sorted(kinds - {"dense"}) + (["modified"] if any(m.modified for m in mine) else [])
            status = "+".join(parts) if parts else "kept"
            if shared:
                status += " (shared)"
        report.layer_status[i] = status
    return report
