"""Calibration text: read a corpus, tokenize it once, cut it into fixed-length sequences.

The model owner calibrates on public text (default: WikiText-2 from the shared data), never on
the data owner's data. Any plain-text file or JSONL with a ``text`` field works.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from ..errors import CalibrationError  # noqa: F401  (re-exported)


def default_calibration_path() -> Path:
    """WikiText-2 validation text in the shared data folder (found as the task loaders find it)."""
    from ..evaluation.tasks import resolve_data_dir

    try:
        return resolve_data_dir() / "text" / "wikitext-2-raw" / "wiki.valid.raw"
    except FileNotFoundError as exc:
        raise CalibrationError(f"no default calibration text: {exc}; pass --calib PATH") from exc


def read_corpus(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {path}")
    if path.suffix == ".json":  # a JSON document (Alpaca-style instructions?) is no running text
        raise CalibrationError(f"{path}: calibration takes plain text or JSONL with a 'text' field, not a .json file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    if path.suffix == ".jsonl":
        texts = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CalibrationError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({exc})") from exc
            if not isinstance(text, str):
                raise CalibrationError(f"{path}:{lineno}: 'text' is {type(text).__name__}, expected a string")
            texts.append(text)
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise CalibrationError(f"calibration file is empty: {path}")
    return raw


@dataclass(frozen=True)
class CalibrationSpec:
    path: str
    num_sequences: int = 128
    seq_len: int = 512
    batch_size: int = 8

    def describe(self) -> dict:
        """What the emulator's manifest records: the file's name, size and hash, never its path
        (the model owner's folders are none of the data owner's business)."""
        import hashlib

        path = Path(self.path)
        described = {"name": path.name}
        if path.is_file():
            described.update(bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
        return {**described, "num_sequences": self.num_sequences, "seq_len": self.seq_len}


def calibration_batches(tokenizer, spec: CalibrationSpec) -> list[torch.Tensor]:
    """``num_sequences`` consecutive chunks of ``seq_len`` tokens, in batches of ``batch_size``."""
    if spec.num_sequences < 1 or spec.seq_len < 2:
        raise CalibrationError("calibration needs at least one sequence of at least 2 tokens")
    text = read_corpus(spec.path)
    # Tokenizing a whole 1 MB corpus is slow; only the needed prefix is tokenized (characters are
    # a safe over-estimate of tokens times 8 for any BPE vocabulary we support).
    needed_chars = spec.num_sequences * spec.seq_len * 8
    ids = tokenizer(text[:needed_chars], return_tensors="pt", add_special_tokens=False).input_ids[0]
    needed = spec.num_sequences * spec.seq_len
    if ids.numel() < needed:
        raise CalibrationError(
            f"calibration text {spec.path} has {ids.numel()} tokens; {spec.num_sequences} x {spec.seq_len} "
            f"= {needed} needed (use fewer or shorter sequences, or more text)"
        )
    chunks = ids[:needed].view(spec.num_sequences, spec.seq_len)
    return list(chunks.split(spec.batch_size))
