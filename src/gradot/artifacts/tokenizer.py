"""The emulator's tokenizer, loaded without trusting it: ``tokenizer.json`` bounded in size and in
its rules, then probed in a memory- and time-limited child process before this process loads it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ArtifactError
from .emulator_io import read_config
from .files import CONFIG_FILE, EMULATOR_FILE, MANIFEST, MAX_SMALL_FILE_BYTES, _check_hash, _parse_json, _read_bounded, _short, _why
from .manifest import read_manifest


#: Bounds on a shipped tokenizer (public tokenizers add at most a few thousand tokens, and replace or
#: prepend a character or two).
MAX_ADDED_TOKENS = 20_000


MAX_REPLACEMENT_CHARS = 64


#: The probe: ordinary text, and long runs of each kind of character (a backtracking split regex
#: fails on long words; an expanding normalizer shows in the token count).
PROBE_TEXTS = ["The offsite-tuning protocol, in 2024: 3.5 % of users' data!"] + [
    c * 20_000 + end for c in ("a", "Z", "0", " ", "\n", ".", "-", "'", "\u00e9", "\u4e2d", "\U0001f642")
    for end in ("", "b!")
] + ["ab1. " * 4_000, "a'b-c " * 3_000]


PROBE_SECONDS, PROBE_MEMORY = 120, 2 << 30


MAX_TOKENS_PER_CHAR = 8  # byte-level BPE: at most 4 per code point


_PROBE = """
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
ratio, top = 0.0, max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
for text in json.load(sys.stdin):
    ids = tok.encode(text, add_special_tokens=False).ids
    ratio, top = max(ratio, len(ids) / len(text)), max([top] + ids)
print(json.dumps({"ratio": ratio, "max_id": top}))
"""


def _limit_memory() -> None:  # runs in the probe's child process, before it executes
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (PROBE_MEMORY, PROBE_MEMORY))


def _check_tokenizer_json(path: Path, shown: Path) -> None:
    """Structural bounds on tokenizer.json: added tokens, and literal replacements' lengths."""
    data = _parse_json(_read_bounded(path, MAX_SMALL_FILE_BYTES), shown)
    if not isinstance(data, dict):
        raise ArtifactError(f"{shown}: expected a JSON object")
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or len(added) > MAX_ADDED_TOKENS:
        count = f"{len(added):,}" if isinstance(added, list) else _short(added)
        raise ArtifactError(f"{shown}: {count} added tokens, "
                            f"more than the {MAX_ADDED_TOKENS:,} a tokenizer may add")
    stack = [data.get(part) for part in ("normalizer", "pre_tokenizer", "decoder")]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, dict):
            for key in ("content", "prepend"):
                if isinstance(node.get(key), str) and len(node[key]) > MAX_REPLACEMENT_CHARS:
                    raise ArtifactError(f"{shown}: a {_short(node.get('type'))} rule inserts {len(node[key]):,} "
                                        f"characters (at most {MAX_REPLACEMENT_CHARS})")
            stack.extend(node.values())


def _probe_tokenizer(path: Path, shown: Path, vocab_size: int) -> None:
    """Run the shipped tokenizer on the probe texts in a child process, bounded in time and memory:
    a Rust panic, a hang or a blow-up there is a refusal here, and no token id may fall outside the
    model's vocabulary."""
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _PROBE, str(path)], input=json.dumps(PROBE_TEXTS),
                              capture_output=True, text=True, timeout=PROBE_SECONDS, preexec_fn=_limit_memory)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"{shown}: the shipped tokenizer took over {PROBE_SECONDS} s on long words") from None
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no message"]
        why = next((line for line in reversed(lines) if "Exception:" in line or "Error:" in line), lines[-1])
        raise ArtifactError(f"{shown}: the shipped tokenizer fails on long words or ordinary text ({_why(why)})")
    result = json.loads(done.stdout)
    if result["ratio"] > MAX_TOKENS_PER_CHAR:
        raise ArtifactError(f"{shown}: the shipped tokenizer makes {result['ratio']:.0f} tokens of one character "
                            f"(at most {MAX_TOKENS_PER_CHAR})")
    if result["max_id"] >= vocab_size:
        raise ArtifactError(f"{shown}: the shipped tokenizer has token id {result['max_id']}, the model has "
                            f"{vocab_size} embeddings")


def load_emulator_tokenizer(folder: str | os.PathLike):
    """The tokenizer shipped in an emulator directory (its files are hash-checked first, its
    bounds checked, and it is probed in a child process before it is loaded here)."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    manifest = read_manifest(folder, "emulator")
    for needed in ("tokenizer_config.json", "tokenizer.json"):
        if needed not in manifest["files"]:
            raise ArtifactError(f"{folder}: the emulator ships no {needed} (saved without a fast tokenizer)")
    if CONFIG_FILE not in manifest["files"]:
        raise ArtifactError(f"{folder / MANIFEST}: must list {CONFIG_FILE}")
    # transformers reads whatever tokenizer files sit in the folder (added tokens, chat templates),
    # listed or not: load from a private copy of the listed files, hash-checked after copying.
    with tempfile.TemporaryDirectory(prefix="gradot-tokenizer-") as tmp:
        for name, entry in manifest["files"].items():
            if name != EMULATOR_FILE:
                shutil.copyfile(_check_hash(folder, name, entry), Path(tmp) / name)
                try:
                    _check_hash(Path(tmp), name, entry)
                except ArtifactError as exc:
                    raise ArtifactError(f"{folder / name}: changed while being read") from exc
        config = read_config(Path(tmp), shown=folder)  # refuses custom code before the tokenizer loader reads it
        tok_config = Path(tmp) / "tokenizer_config.json"
        raw = _parse_json(_read_bounded(tok_config, MAX_SMALL_FILE_BYTES), folder / tok_config.name)
        if not isinstance(raw, dict):
            raise ArtifactError(f"{folder / tok_config.name}: expected a JSON object")
        if "auto_map" in raw:
            raise ArtifactError(f"{folder / tok_config.name}: asks for custom code (auto_map); gradot never runs it")
        if len(raw.get("added_tokens_decoder") or ()) > MAX_ADDED_TOKENS:
            raise ArtifactError(f"{folder / tok_config.name}: more than the {MAX_ADDED_TOKENS:,} added tokens a "
                                f"tokenizer may have")
        _check_tokenizer_json(Path(tmp) / "tokenizer.json", folder / "tokenizer.json")
        _probe_tokenizer(Path(tmp) / "tokenizer.json", folder / "tokenizer.json", config.vocab_size)
        try:
            tok = AutoTokenizer.from_pretrained(tmp, local_files_only=True, trust_remote_code=False)
            tok("The offsite-tuning protocol.")  # a field of the wrong type may only fail on first use
        except Exception as exc:  # noqa: BLE001
            # The one place the sender's tokenizer files meet third-party parsers, and the tokenizers
            # library reports a malformed tokenizer.json as a bare Exception (TypeError, KeyError,
            # AttributeError come from transformers on wrongly typed fields).
            raise ArtifactError(f"{folder}: cannot load the shipped tokenizer ({_why(exc)})") from exc
    top = max(tok.get_vocab().values(), default=-1)  # added tokens included
    if top >= config.vocab_size:
        raise ArtifactError(f"{folder / 'tokenizer.json'}: the shipped tokenizer has token id {top}, the model has "
                            f"{config.vocab_size} embeddings")
    tok.name_or_path = str(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
