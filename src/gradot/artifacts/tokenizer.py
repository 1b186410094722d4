"""The emulator's tokenizer, loaded without trusting it: ``tokenizer.json`` bounded in size and in
its rules (counts, worst-case growth per character), then probed in a memory- and CPU-limited child
process before this process loads it (the probe's verdict cached per tokenizer hash); and the cap
on tokens per encoded text that every tokenization of gradot's applies."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ..errors import ArtifactError
from ..token_cap import MAX_TOKENS_PER_CHAR
from .emulator_io import read_config
from .files import CONFIG_FILE, EMULATOR_FILE, MANIFEST, MAX_SMALL_FILE_BYTES, _check_hash, _parse_json, _read_bounded, _short, _why, logger
from .manifest import read_manifest


#: Bounds on a shipped tokenizer (public tokenizers add at most a few thousand tokens, and replace or
#: prepend a character or two).
MAX_ADDED_TOKENS = 20_000


MAX_REPLACEMENT_CHARS = 64


#: Rules a normalizer or pre-tokenizer chain may hold (public ones hold at most four or five).
MAX_CHAIN_RULES = 16


#: Worst-case characters one input character may become through the normalizer and pre-tokenizer
#: together (NFKC's 18, times byte-level's 4, is the widest public combination).
MAX_GROWTH = 256


#: Characters one input character can become under each rule type (a Replace is computed from its
#: strings; splitting pre-tokenizers never grow text). Types not listed count 1.
_GROWTH = {"NFC": 3, "NFD": 4, "NFKC": 18, "NFKD": 18, "Precompiled": 18, "Lowercase": 3, "BertNormalizer": 3,
           "ByteLevel": 4}


def _rule_growth(node: dict) -> float:
    if node.get("type") == "Replace":
        pattern, content = node.get("pattern") or {}, node.get("content")
        width = len(content) if isinstance(content, str) else 0
        literal = pattern.get("String") if isinstance(pattern, dict) else None
        if isinstance(literal, str) and literal:
            return max(1.0, width / len(literal))
        return 1.0 + width  # a regex may match the empty string: an insertion before every character
    return float(_GROWTH.get(node.get("type"), 1))


def _chain(node) -> list[dict]:
    """The rules of a normalizer or pre-tokenizer, Sequences flattened."""
    if isinstance(node, dict) and node.get("type") == "Sequence":
        parts = node.get("normalizers", node.get("pretokenizers"))
        return [rule for part in (parts if isinstance(parts, list) else []) for rule in _chain(part)]
    return [node] if isinstance(node, dict) else []


def _rule_characters(rules: list[dict]) -> str:
    """Every character the rules' patterns and replacements name: the probe runs each of them."""
    chars = set()
    for rule in rules:
        pattern = rule.get("pattern")
        for text in list(pattern.values() if isinstance(pattern, dict) else []) + [rule.get("content"),
                                                                                 rule.get("prepend")]:
            if isinstance(text, str):
                chars.update(text)
    return "".join(sorted(chars))


def _check_chains(data: dict, shown: Path) -> str:
    """The static bounds on the normalizer and pre-tokenizer chains: rule counts and worst-case
    growth per character. Returns the characters the rules name (for the probe)."""
    growth, rules = 1.0, []
    for part in ("normalizer", "pre_tokenizer"):
        chain = _chain(data.get(part))
        if len(chain) > MAX_CHAIN_RULES:
            raise ArtifactError(f"{shown}: the {part} chains {len(chain):,} rules (at most {MAX_CHAIN_RULES})")
        for rule in chain:
            growth *= _rule_growth(rule)
        rules += chain
    if growth > MAX_GROWTH:
        raise ArtifactError(f"{shown}: the normalizer and pre-tokenizer can make up to {growth:,.0f} characters of "
                            f"one (at most {MAX_GROWTH})")
    return _rule_characters(rules)


#: The probe: ordinary text, long runs of each kind of character (a backtracking split regex fails
#: on long words; an expanding normalizer shows in the token count), and runs of characters of every
#: Unicode class the vocabulary holds (up to PROBE_PER_CLASS of each) and every character the rules name.
PROBE_TEXTS = ["The offsite-tuning protocol, in 2024: 3.5 % of users' data!"] + [
    c * 20_000 + end for c in ("a", "Z", "0", " ", "\n", ".", "-", "'", "\u00e9", "\u4e2d", "\U0001f642")
    for end in ("", "b!")
] + ["ab1. " * 4_000, "a'b-c " * 3_000]


PROBE_PER_CLASS, PROBE_RUN = 8, 2_000


#: The probe's limits: CPU seconds (the verdict does not depend on how busy the machine is), wall
#: seconds (a backstop), address space.
PROBE_CPU_SECONDS, PROBE_SECONDS, PROBE_MEMORY = 10, 60, 2 << 30


#: Bumped whenever the probe changes: cached verdicts of an older probe are not reused.
PROBE_VERSION = 2


_PROBE = r"""
import json, sys, unicodedata
from tokenizers import Tokenizer
spec = json.load(sys.stdin)
tok = Tokenizer.from_file(sys.argv[1])
vocab = tok.get_vocab(with_added_tokens=True)
top = max(vocab.values(), default=-1)
chars = set(spec["extra"])
for token in vocab:
    try:  # the text a token stands for (byte-level and metaspace vocabularies spell it otherwise)
        chars.update(tok.decoder.decode([token]) if tok.decoder is not None else token)
    except Exception:
        chars.update(token)
classes = {}
for c in sorted(chars):
    classes.setdefault(unicodedata.category(c), []).append(c)
picked = set(spec["extra"])
for members in classes.values():
    n = min(len(members), spec["per_class"])
    picked.update(members[i * len(members) // n] for i in range(n))
picked = sorted(picked)
texts = spec["texts"] + [c * spec["run"] for c in picked] + [" ".join(c * 8 for c in picked)]
ratio = 0.0
for text in texts:
    ids = tok.encode(text, add_special_tokens=False).ids
    ratio, top = max(ratio, len(ids) / len(text)), max([top] + ids)
print(json.dumps({"ratio": ratio, "max_id": top, "classes": len(classes), "characters": len(picked)}))
"""


def _limit_resources() -> None:  # runs in the probe's child process, before it executes
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (PROBE_MEMORY, PROBE_MEMORY))
    resource.setrlimit(resource.RLIMIT_CPU, (PROBE_CPU_SECONDS, PROBE_CPU_SECONDS))


def _check_tokenizer_json(data: bytes, shown: Path) -> str:
    """Structural bounds on tokenizer.json: added tokens, literal replacements' lengths, and the
    normalizer and pre-tokenizer chains. Returns the characters the chains' rules name."""
    data = _parse_json(data, shown)
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
    return _check_chains(data, shown)


def _run_probe(path: Path, extra: str, vocab_size: int) -> tuple[str | None, bool]:
    """The probe's verdict on the tokenizer at ``path``: ``(why it is refused or None, whether the
    verdict may be cached)``. It runs in a child process, bounded in CPU time, wall time and memory:
    a Rust panic, a hang or a blow-up there is a refusal here."""
    spec = {"texts": PROBE_TEXTS, "extra": extra, "per_class": PROBE_PER_CLASS, "run": PROBE_RUN}
    try:
        done = subprocess.run([sys.executable, "-I", "-c", _PROBE, str(path)], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=PROBE_SECONDS, preexec_fn=_limit_resources)
    except subprocess.TimeoutExpired:  # wall time: may say more about the machine's load, not cached
        return f"the shipped tokenizer took over {PROBE_SECONDS} s on the probe texts", False
    if done.returncode == -signal.SIGXCPU or done.returncode == -signal.SIGKILL:
        return (f"the shipped tokenizer took over {PROBE_CPU_SECONDS} s of CPU time on the probe texts (long words "
                f"or one run per character class of its vocabulary)"), True
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no message"]
        why = next((line for line in reversed(lines) if "Exception:" in line or "Error:" in line), lines[-1])
        return f"the shipped tokenizer fails on long words or ordinary text ({_why(why)})", True
    result = json.loads(done.stdout)
    if result["ratio"] > MAX_TOKENS_PER_CHAR:
        return (f"the shipped tokenizer makes {result['ratio']:.0f} tokens of one character "
                f"(at most {MAX_TOKENS_PER_CHAR})"), True
    if result["max_id"] >= vocab_size:
        return f"the shipped tokenizer has token id {result['max_id']}, the model has {vocab_size} embeddings", True
    return None, True


def _verdict_path(data: bytes, extra: str, vocab_size: int) -> Path:
    from ..modeling import cache_dir

    key = hashlib.sha256(json.dumps([PROBE_VERSION, vocab_size, extra]).encode() + data).hexdigest()
    return cache_dir() / "tokenizer-verdicts" / f"{key}.json"


def _probe_tokenizer(path: Path, shown: Path, data: bytes, extra: str, vocab_size: int) -> None:
    """Refuse the tokenizer (``data``: its tokenizer.json) if the probe does; the verdict is cached
    per tokenizer hash (with the probe's version and the model's vocabulary size), so a tokenizer
    is judged once."""
    cached = _verdict_path(data, extra, vocab_size)
    try:
        verdict = json.loads(cached.read_text())
        why = verdict["refused"]
    except (OSError, ValueError, KeyError, TypeError):
        why, keep = _run_probe(path, extra, vocab_size)
        if keep:
            try:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
                tmp.write_text(json.dumps({"refused": why}))
                os.replace(tmp, cached)
            except OSError as exc:  # a read-only cache: the next load probes again
                logger.info("tokenizer verdict not cached (%s)", _why(exc))
    if why is not None:
        raise ArtifactError(f"{shown}: {why}")


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
        tok_json = _read_bounded(Path(tmp) / "tokenizer.json", MAX_SMALL_FILE_BYTES)
        extra = _check_tokenizer_json(tok_json, folder / "tokenizer.json")
        _probe_tokenizer(Path(tmp) / "tokenizer.json", folder / "tokenizer.json", tok_json, extra, config.vocab_size)
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
