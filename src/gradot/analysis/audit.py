"""The model owner's audit: how close does an emulator get to the original after a data owner heals it?

An audit heals a copy of the emulator (``gradot.analysis.healing``) on public text and measures it at each
token budget: WikiText-2 *test* token perplexity and zero-shot accuracy. The same attack on the
*random-middle reference* (the original model with its middle layers re-initialised: embeddings,
head and adapter layers exact, everything else learned from the attack text alone) says how much
of the healed quality the attacker's own training gives; the rest is what the shipped middle gave.

Per budget ``b`` (``gaps``), on log-perplexity (and likewise on accuracy):
  * ``gap_to_original``: log ppl_healed(b) - log ppl_original (nats/token; 0 = the original won back),
  * ``protected``: (log ppl_healed(b) - log ppl_original) / (log ppl_reference(b) - log ppl_original),
    the share of what a middle-less attacker still lacks that the emulator's holder lacks too
    (1 = the shipped middle helped nothing, 0 = it handed over the original). ``1 - protected`` is
    the leak.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from ..cells import write_json_atomic
from .healing import HealConfig, attack_sequences, heal, randomize_middle, trainable_parameters

DEFAULT_TASKS = ("arc_easy", "sciq", "piqa")


def perplexity_sequences(tokenizer, path: str | os.PathLike, tokens: int = 32_768, seq_len: int = 512,
                         batch_size: int = 4) -> list[torch.Tensor]:
    """The first ``tokens`` tokens of ``path`` (WikiText-2 test by default) in ``seq_len`` chunks."""
    from ..stats.calib import CalibrationSpec, calibration_batches

    return calibration_batches(tokenizer, CalibrationSpec(str(path), max(1, tokens // seq_len), seq_len, batch_size))


def measurer(tokenizer, ppl_batches: Sequence[torch.Tensor], tasks: Sequence[str] = DEFAULT_TASKS,
             limit: int | None = 500, data_dir: str | os.PathLike | None = None,
             batch_size: int = 8, tasks_at: Sequence[int] | None = None) -> Callable[[nn.Module, int], dict]:
    """``measure(model, tokens) -> {"perplexity", "<task>", "<task>_stderr", ...}`` (accuracy in [0, 1]);
    the zero-shot tasks only at the budgets ``tasks_at`` when given (they cost more than perplexity)."""
    from ..evaluation.lmeval import evaluate
    from .proxy import perplexity

    def measure(model: nn.Module, tokens: int = 0) -> dict:
        model.eval()
        out = {"perplexity": perplexity(model, ppl_batches)}
        if tasks and (tasks_at is None or tokens in tasks_at):
            with torch.no_grad():
                scores = evaluate(model, tokenizer, list(tasks), data_dir=data_dir, limit=limit, batch_size=batch_size)
            for task in tasks:
                out[task], out[f"{task}_stderr"] = scores[task]["acc"], scores[task]["acc_stderr"]
        return out

    return measure


def random_middle_reference(model: nn.Module, middle: Sequence[int], seed: int = 0) -> nn.Module:
    """A copy of ``model`` whose middle layers are freshly initialised."""
    return randomize_middle(copy.deepcopy(model), middle, seed)


def heal_copy(model: nn.Module, middle: Sequence[int], sequences: torch.Tensor, config: HealConfig,
              measure: Callable[[nn.Module, int], dict], checkpoint: str | os.PathLike, identity: dict,
              progress: Callable[[str], None] | None = None,
              on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Heal a copy of ``model`` (the caller's model is left as it is); records per budget."""
    attacked = trainable_parameters(copy.deepcopy(model), config.train, middle, config.lora_r)
    return heal(attacked, sequences, config, measure, checkpoint, identity, progress, on_record)


def _log_gap(value: float, original: float) -> float:
    return math.log(value) - math.log(original)


def gaps(records: Sequence[dict], original: dict, reference: Sequence[dict] | None,
         tasks: Sequence[str]) -> list[dict]:
    """Each healed record with its gap to the original and, where the reference was measured at
    the same budget, the share of the reference's gap that is left (``protected``)."""
    by_tokens = {r["tokens"]: r for r in reference or []}
    out = []
    for r in records:
        row = {"tokens": r["tokens"], "perplexity": r["perplexity"],
               "ppl_gap": _log_gap(r["perplexity"], original["perplexity"])}
        for t in tasks:
            if t in r:
                row[t] = r[t]
                row[f"{t}_gap"] = original[t] - r[t]
        ref = by_tokens.get(r["tokens"])
        if ref is not None:
            row["ppl_protected"] = _share(row["ppl_gap"], _log_gap(ref["perplexity"], original["perplexity"]))
            accs = [t for t in tasks if t in r and t in ref]
            if accs:
                row["acc_protected"] = _share(sum(original[t] - r[t] for t in accs),
                                              sum(original[t] - ref[t] for t in accs))
        out.append(row)
    return out


def _share(gap: float, reference_gap: float) -> float | None:
    return None if reference_gap <= 0 else gap / reference_gap


def settings_record(config: HealConfig, files: Sequence[str | os.PathLike], tasks: Sequence[str],
                    limit: int | None, ppl_tokens: int, ppl_len: int = 512) -> dict:
    """What a healing measurement depends on (the cache key of its cells)."""
    return {"heal": asdict(config), "text": [Path(f).name for f in files], "tasks": list(tasks), "limit": limit,
            "ppl_tokens": ppl_tokens, "ppl_len": ppl_len}


def markdown(report: dict) -> str:
    """The audit's table: per budget, the healed emulator and the reference against the original."""
    tasks, o = report["tasks"], report["original"]
    head = ["budget (tokens)", "attacker CPU-s", "perplexity", "ppl protected"] + tasks + ["acc protected"]
    lines = [f"# Healing audit: {report['emulator']}", "",
             f"Original: perplexity {o['perplexity']:.2f}; " + ", ".join(f"{t} {o[t]:.3f}" for t in tasks) + ".",
             f"Attack text: {', '.join(report['settings']['text'])}; attacker trains {report['settings']['heal']['train']} "
             f"parameters at lr {report['settings']['heal']['lr']:g}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x, spec: "n/a" if x is None else format(x + 0.0, spec)  # noqa: E731
    for name, kind in (("emulator", "emulator"), ("random-middle reference", "reference")):
        rows, records = report.get(f"{kind}_rows") or [], {r["tokens"]: r for r in report.get(f"{kind}_records") or []}
        if rows:
            lines.append(f"| **{name}** |" + " |" * (len(head) - 1))
        for row in rows:
            cpu = records.get(row["tokens"], {}).get("cpu_seconds")
            lines.append("| " + " | ".join([f"{row['tokens']:,}", fmt(cpu, ".0f"), f"{row['perplexity']:.1f}",
                                            fmt(row.get("ppl_protected"), ".2f")]
                                           + [fmt(row.get(t), ".3f") for t in tasks]
                                           + [fmt(row.get("acc_protected"), ".2f")]) + " |")
    lines += ["", "ppl/acc protected: the share of the random-middle reference's gap to the original that the "
              "healed emulator still has at the same budget (1: the shipped middle gave the attacker nothing; "
              "0: the original recovered)."]
    return "\n".join(lines) + "\n"


def audit_budgets(budget: int, tokens_per_step: int) -> tuple[int, ...]:
    """0 and three log-spaced budgets up to ``budget`` (÷64, ÷8, ×1), each a whole number of steps."""
    steps = sorted({max(1, round(budget / d / tokens_per_step)) for d in (64, 8, 1)} if budget else set())
    return (0,) + tuple(s * tokens_per_step for s in steps)


def check_fits(emulator_manifest: dict, model: nn.Module) -> None:
    """Refuse an emulator that was not compressed from ``model`` (its base fingerprint)."""
    from ..errors import HealError
    from ..split import fingerprint, split_model

    base, k = emulator_manifest["base"], emulator_manifest["adapter"]["k"]
    dtype = getattr(torch, emulator_manifest.get("dtype", "float32"))
    if fingerprint(model, split_model(model, k), as_dtype=dtype) != base["fingerprint"]:
        raise HealError(f"the emulator was compressed from another model than this one ({base.get('name_or_path')}, "
                        "by its base fingerprint); pass the model it was made from with --model")


def run_audit(model: nn.Module, tokenizer, emulator, files: Sequence[str | os.PathLike], config: HealConfig,
              measure: Callable[[nn.Module, int], dict], out: str | os.PathLike, settings: dict, reference: bool = True,
              progress: Callable[[str], None] | None = None) -> dict:
    """Heal ``emulator`` (and the random-middle reference of ``model``) on ``files`` at each budget of
    ``config``; write ``audit.json`` and ``audit.md`` to ``out`` after every measurement (resumable
    from ``out/state``). Returns the report."""

    from ..split import split_model

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    tasks = list(settings["tasks"])
    original = _cached(out / "original.json", settings, lambda: measure(model, 0), say)
    sequences = attack_sequences(tokenizer, files, config.budgets[-1], config.seq_len)
    emu_middle = [i for i, s in enumerate(emulator.slots) if s.role == "middle"]
    report = {"emulator": emulator.manifest["method"] + f" (keep {emulator.manifest['size']['keep_achieved']:.2f})",
              "settings": settings, "tasks": tasks, "original": original, "emulator_records": [],
              "reference_records": []}

    def publish(kind: str):
        def write(records: list[dict]) -> None:
            report[f"{kind}_records"] = records
            ref = report["reference_records"]
            report["emulator_rows"] = gaps(report["emulator_records"], original, ref, tasks)
            report["reference_rows"] = gaps(ref, original, ref, tasks)
            write_json_atomic(out / "audit.json", report)
            (out / "audit.md").write_text(markdown(report))
        return write

    identity = {"settings": settings, "fingerprint": emulator.manifest["base"]["fingerprint"]}
    say("healing the emulator")
    heal_copy(emulator.model, emu_middle, sequences, config, measure, out / "state" / "emulator",
              {**identity, "what": "emulator", "slots": emulator.manifest["slots"]}, say, publish("emulator"))
    if reference:
        say("healing the random-middle reference (the original with its middle re-initialised)")
        middle = split_model(model, emulator.manifest["adapter"]["k"]).middle
        heal_copy(random_middle_reference(model, middle), middle, sequences, config, measure,
                  out / "state" / "reference", {**identity, "what": "reference"}, say, publish("reference"))
    return report


def _cached(path: Path, settings: dict, compute: Callable[[], dict], say) -> dict:
    import json

    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("settings") == settings:
            return cached["measured"]
    say("measuring the original model")
    measured = compute()
    write_json_atomic(path, {"settings": settings, "measured": measured})
    return measured
