"""The healing attack: a data owner fine-tunes the emulator it holds on public text to win back the
original model.

The data owner holds every emulator weight in the clear (embeddings, head, adapter layers, the
compressed middle) and can read as much public text as it likes. ``heal`` trains a model on such
text (AdamW, linear warm-up then a constant learning rate, fixed-length sequences) and stops at
each of a list of token budgets to let the caller measure it, so one run gives the whole curve.

Everything needed to resume sits in one checkpoint folder (safetensors + JSON, written atomically):
the trainable tensors, AdamW's moments, the step and the measurements taken so far. Training is
deterministic given the text (no dropout; the data order is fixed), so a resumed run reproduces an
uninterrupted one to the bit.

Which parameters the attacker trains (``HealConfig.train``):
  * ``all``: every parameter (the strongest attacker; the default),
  * ``middle``: only the middle block (embeddings, head and adapter frozen),
  * ``lora``: low-rank adapters on every linear of every layer (peft), a cheap attacker.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import HealError
from ..registry import decoder_layers

TRAINABLE = ("all", "middle", "lora")


@dataclass(frozen=True)
class HealConfig:
    """How the attacker trains. Defaults chosen on a learning-rate sweep (docs/privacy.md)."""

    budgets: tuple[int, ...] = (0, 32_768, 262_144, 1_048_576)  # tokens; measured at each
    lr: float = 3e-4  # best of 1e-4, 3e-4, 1e-3 on GradOT 0.7 and OT† 0.85 (results/heal-sweep)
    warmup_steps: int = 8
    seq_len: int = 256
    batch_size: int = 8
    weight_decay: float = 0.0
    train: str = "all"
    lora_r: int = 16
    checkpoint_every: int = 16  # steps between resumable checkpoints inside a budget

    def __post_init__(self):
        budgets = tuple(int(b) for b in self.budgets)
        if not budgets or any(b < 0 for b in budgets) or list(budgets) != sorted(set(budgets)):
            raise HealError(f"budgets must be distinct non-negative token counts in increasing order, got {self.budgets}")
        object.__setattr__(self, "budgets", budgets)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise HealError(f"lr must be a positive number, got {self.lr}")
        if self.seq_len < 2 or self.batch_size < 1 or self.warmup_steps < 0 or self.checkpoint_every < 1:
            raise HealError("seq_len >= 2, batch_size >= 1, warmup_steps >= 0 and checkpoint_every >= 1 are needed")
        if self.train not in TRAINABLE:
            raise HealError(f"train must be one of {', '.join(TRAINABLE)}, got {self.train!r}")
        if self.lora_r < 1:
            raise HealError(f"lora_r must be >= 1, got {self.lora_r}")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size

    def steps_for(self, budget: int) -> int:
        return -(-budget // self.tokens_per_step)


# --- the attacker's text ------------------------------------------------------------------------

def default_attack_files(data_dir: str | os.PathLike) -> list[Path]:
    """Public text a data owner plausibly has, none of it the evaluation text (WikiText-2 *test*,
    the tasks' validation questions): RACE training articles, WikiText-2 valid, tinyshakespeare,
    the Alpaca instructions."""
    d = Path(data_dir)
    return [d / "race" / "train.jsonl.gz", d / "text" / "wikitext-2-raw" / "wiki.valid.raw",
            d / "text" / "tinyshakespeare.txt", d / "instruct" / "alpaca_data_1k.json"]


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of one text file: plain text (.txt/.raw: the whole file), JSONL (optionally
    gzipped) with a ``text`` or ``article`` field per line, or a JSON list of instruction records
    (``instruction``/``input``/``output``)."""
    path = Path(path)
    if not path.is_file():
        raise HealError(f"attack text not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    stem = path.name.removesuffix(".gz")
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            raw = f.read()
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise HealError(f"{path}: not readable UTF-8 text ({exc})") from exc
    if stem.endswith(".jsonl"):
        docs = [_field(json.loads(line), path, n) for n, line in enumerate(raw.splitlines(), 1) if line.strip()]
    elif stem.endswith(".json"):
        records = json.loads(raw)
        if not isinstance(records, list):
            raise HealError(f"{path}: expected a JSON list of records")
        docs = ["\n".join(str(r.get(k, "")) for k in ("instruction", "input", "output") if r.get(k))
                for r in records if isinstance(r, dict)]
    else:
        docs = [raw]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise HealError(f"{path}: no text in it")
    return docs


def _field(record: Any, path: Path, lineno: int) -> str:
    for key in ("text", "article"):
        if isinstance(record, dict) and isinstance(record.get(key), str):
            return record[key]
    raise HealError(f"{path}:{lineno}: expected a JSON object with a 'text' or 'article' string")


def attack_sequences(tokenizer, files: Sequence[str | os.PathLike], tokens: int, seq_len: int) -> torch.Tensor:
    """``ceil(tokens / seq_len)`` sequences of ``seq_len`` tokens, taken in turn from each file
    (round-robin, so the mixture is even while every file lasts): documents joined by the EOS
    token and cut into consecutive chunks. The first n sequences do not depend on ``tokens``, so
    every budget of one run sees a prefix of the same stream."""
    needed = max(1, -(-tokens // seq_len))
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    per_file = []
    for path in files:
        ids: list[int] = []
        for doc in read_documents(path):
            ids += tokenizer(doc, add_special_tokens=False).input_ids + [eos]
            if len(ids) >= needed * seq_len:
                break
        per_file.append([ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)])
    out = []
    for turn in range(max(len(c) for c in per_file)):
        out += [chunks[turn] for chunks in per_file if turn < len(chunks)]
        if len(out) >= needed:
            break
    if len(out) < needed:
        raise HealError(f"the attack text holds {len(out) * seq_len} tokens in {seq_len}-token sequences; "
                        f"{needed * seq_len} needed (add --text files or lower the budget)")
    return torch.tensor(out[:needed], dtype=torch.long)


# --- reference and trainable parameters ---------------------------------------------------------

def randomize_middle(model: nn.Module, positions: Sequence[int], seed: int = 0) -> nn.Module:
    """Re-initialise the decoder layers at ``positions`` the way the architecture initialises a new
    model (its ``_init_weights``), in place: the random-middle reference."""
    torch.manual_seed(seed)
    layers = decoder_layers(model)
    for i in positions:
        for module in layers[i].modules():
            model._init_weights(module)
    return model


def trainable_parameters(model: nn.Module, train: str, middle: Sequence[int], lora_r: int = 16) -> nn.Module:
    """Set ``requires_grad`` for the attacker ``train`` and return the model to train (a peft model
    for ``lora``)."""
    if train == "lora":
        from peft import LoraConfig, get_peft_model

        for p in model.parameters():
            p.requires_grad_(False)
        return get_peft_model(model, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules="all-linear",
                                                lora_dropout=0.0))
    layers = decoder_layers(model)
    keep = {id(p) for i in middle for p in layers[i].parameters()} if train == "middle" else None
    for p in model.parameters():
        p.requires_grad_(keep is None or id(p) in keep)
    return model


# --- the resumable loop ---------------------------------------------------------------------------

STATE_JSON, STATE_TENSORS = "state.json", "state.safetensors"


def _named_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Trainable tensors, AdamW moments and ``state`` (JSON), replacing the folder atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {}
    for name, p in _named_trainable(model).items():
        tensors[f"param.{name}"] = p.detach().contiguous().clone()
        st = optimizer.state.get(p)
        if st:
            tensors[f"exp_avg.{name}"] = st["exp_avg"].contiguous()
            tensors[f"exp_avg_sq.{name}"] = st["exp_avg_sq"].contiguous()
    save_file(tensors, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(state, indent=1))
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, key: dict) -> dict | None:
    """Restore what ``save_state`` wrote (None when there is no checkpoint); refuse, before touching
    the model, a checkpoint whose ``key`` (settings and identity) is not this run's."""
    if not (folder / STATE_JSON).is_file():
        return None
    state = json.loads((folder / STATE_JSON).read_text())
    if state.get("key") != key:
        raise HealError(f"{folder} holds a healing run of other settings; pass another folder or delete it")
    tensors = load_file(str(folder / STATE_TENSORS))
    with torch.no_grad():
        for name, p in _named_trainable(model).items():
            p.copy_(tensors[f"param.{name}"])
            if f"exp_avg.{name}" in tensors:
                optimizer.state[p] = {"step": torch.tensor(float(state["step"])),
                                      "exp_avg": tensors[f"exp_avg.{name}"].clone(),
                                      "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].clone()}
    return state


def _lr_at(step: int, config: HealConfig) -> float:
    return config.lr * min(1.0, (step + 1) / (config.warmup_steps + 1))


def heal(model: nn.Module, sequences: torch.Tensor, config: HealConfig, measure: Callable[[nn.Module, int], dict],
         checkpoint: str | os.PathLike, identity: dict | None = None,
         progress: Callable[[str], None] | None = None,
         on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Train ``model`` (its parameters with ``requires_grad``) on ``sequences`` and call
    ``measure(model, tokens)`` at each budget of ``config``. Returns one record per budget: tokens, steps, the attacker's
    CPU- and wall-seconds of training so far, and what ``measure`` returned.

    Resumes from ``checkpoint`` (a folder) when it holds a run of the same recipe (``config`` but
    its budgets) and ``identity`` (what the caller says is being healed); refuses one of another.
    A budget below the checkpoint's step that was not measured then is refused (the weights of
    that moment are gone). ``on_record``
    gets the records so far after each budget is measured (to publish them as they come).
    """
    folder = Path(checkpoint)
    params = list(_named_trainable(model).values())
    if not params:
        raise HealError("nothing to train: no parameter requires a gradient")
    if sequences.shape[1] != config.seq_len or len(sequences) < config.steps_for(config.budgets[-1]) * config.batch_size:
        raise HealError(f"{len(sequences)} sequences of {sequences.shape[1]} tokens cannot feed a "
                        f"{config.budgets[-1]}-token run of {config.seq_len}-token sequences")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    # The trajectory does not depend on where it stops (constant rate after warm-up, one data order):
    # a run asked for more budgets later resumes this one.
    recipe = {k: v for k, v in asdict(config).items() if k not in ("budgets", "checkpoint_every")}
    key = json.loads(json.dumps({"config": recipe, "identity": identity or {}}))  # as read back
    state = load_state(folder, model, optimizer, key)
    state = state or {"key": key, "step": 0, "cpu_seconds": 0.0, "wall_seconds": 0.0, "records": []}
    say = progress or (lambda message: None)
    for budget in config.budgets:
        if any(r["tokens"] == budget for r in state["records"]):
            continue
        if config.steps_for(budget) < state["step"]:
            raise HealError(f"{folder} is past {budget:,} tokens (step {state['step']}) and did not measure it there; "
                            "heal in another folder to measure that budget")
        _train_to(model, optimizer, params, sequences, config, config.steps_for(budget), state, folder, say)
        model.eval()
        record = {"tokens": budget, "steps": state["step"], "cpu_seconds": round(state["cpu_seconds"], 1),
                  "wall_seconds": round(state["wall_seconds"], 1), **measure(model, budget)}
        state["records"].append(record)
        save_state(folder, model, optimizer, state)
        if on_record is not None:
            on_record(sorted(state["records"], key=lambda r: r["tokens"]))
        say(f"{budget:,} tokens: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items()
                                               if isinstance(v, float) and k not in ("cpu_seconds", "wall_seconds")))
    return sorted(state["records"], key=lambda r: r["tokens"])


def _train_to(model, optimizer, params, sequences, config: HealConfig, steps: int, state: dict, folder: Path,
              say) -> None:
    model.train()
    start_step, cpu0, wall0 = state["step"], time.process_time(), time.time()
    while state["step"] < steps:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        batch = sequences[step * config.batch_size:(step + 1) * config.batch_size]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            raise HealError(f"the healing loss is {loss.item()} at step {step}: lower the learning rate")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] = step + 1
        state["cpu_seconds"] += time.process_time() - cpu0
        state["wall_seconds"] += time.time() - wall0
        cpu0, wall0 = time.process_time(), time.time()
        done = state["step"] - start_step
        if state["step"] % config.checkpoint_every == 0 and state["step"] < steps:
            save_state(folder, model, optimizer, state)
        if done == 1 or state["step"] % 8 == 0 or state["step"] == steps:
            per_step = state["wall_seconds"] / max(state["step"], 1)
            say(f"step {state['step']}/{steps} loss {loss.item():.3f} "
                f"(about {per_step * (steps - state['step']) / 60:.0f} min to this budget)")
