"""Trust between the two owners: every artifact one party receives from the other is checked before
use, every refusal is one clear line naming the file, nothing is ever unpickled, a failed command
leaves the disk as it was, and bad command-line input gets exit code 2 and one line.

The fuzz test corrupts manifests (slot dimensions and spans included), safetensors files, configs
and tokenizers (normalizer and pre-tokenizer chains included) at random (seeded and bounded:
``GRADOT_FUZZ_CASES`` cases, default 150, each with a time limit) and requires an ``ArtifactError``
every time (or, for the few corruptions that leave the artifact valid, a usable result), never
another exception type and never a hang.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import random
import re
import resource
import shutil
import signal
import struct
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file

from gradot import artifacts
from gradot.artifacts import (ArtifactError, load_emulator, load_emulator_tokenizer, plug_in, save_adapter,
                              save_emulator, sha256_file)
from gradot.methods.uniform import uniform_emulator
from gradot.cli import main
from gradot.methods.gradot import GradOTConfig, gradot_emulator
from gradot.split import split_model

LAYERS = 8
EMU, ADA, CFG, MAN = "emulator.safetensors", "adapter.safetensors", "config.json", "manifest.json"


def shared_emulator(model, split, clusters):
    """A CRaSh emulator for given clusters (list of (members, representative)), without the CKA pass."""
    from gradot.emulator import assemble
    from gradot.registry import decoder_layers

    layers = decoder_layers(model)
    middle, sources, shares = [], [], []
    for members, rep in clusters:
        owner = len(middle)
        for j, _ in enumerate(members):
            middle.append(copy.deepcopy(layers[rep]) if j == 0 else None)
            sources.append(rep)
            shares.append(None if j == 0 else owner)
    return assemble(model, split, middle, sources, shares, method="crash", keep=0.5)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The original model and pristine artifacts: uniform (with tokenizer), CRaSh-style (shared layers,
    aliases), SVD (low-rank linears, pruned MLPs) emulators and an adapter."""
    root = tmp_path_factory.mktemp("shipped")
    model = tiny_model("llama", layers=LAYERS)
    split = split_model(model, 2)
    emus = {
        "uniform": uniform_emulator(model, split, 0.5),
        "crash": shared_emulator(model, split, [([2, 3], 3), ([4, 5], 4)]),
        "svd": gradot_emulator(model, split, GradOTConfig(keep=0.5, selection="svd"), None, method="svd"),
    }
    dirs = {}
    for name, emu in emus.items():
        save_emulator(emu, root / name, tokenizer=tiny_tokenizer() if name == "uniform" else None)
        dirs[name] = root / name
    save_adapter(emus["uniform"], root / "adapter")
    dirs["adapter"] = root / "adapter"
    return model, dirs


# --------------------------------------------------------------------------------------------- helpers


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MAN).read_text())


def write_manifest(folder: Path, manifest) -> None:
    (folder / MAN).write_text(json.dumps(manifest))


def rehash(folder: Path, name: str) -> None:
    m = read_manifest(folder)
    m["files"][name]["sha256"] = sha256_file(folder / name)
    write_manifest(folder, m)


def copy_of(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def read_st(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def header(data: bytes) -> tuple[int, dict]:
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


def load(model, kind: str, folder: Path):
    """What the receiving party does with an artifact of ``kind``."""
    if kind == "adapter":
        return plug_in(copy.deepcopy(model), folder)
    return load_emulator(folder)


def assert_clean(exc: ArtifactError, folder: Path) -> None:
    message = str(exc)
    assert "\n" not in message, message
    assert str(folder) in message, f"message does not name the artifact: {message}"


class CaseTimeout(BaseException):
    pass


@contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------- fuzz
#
# Every corruption returns (description, must_refuse). must_refuse=False marks the few corruptions
# that may leave a valid artifact (a changed informational field, a flipped weight with the hash
# updated): those must then load and run, or be refused cleanly.

INFORMATIONAL = (("settings",), ("calibration",), ("training",), ("emulator",), ("base", "name_or_path"))


def all_paths(obj, prefix=()):
    if isinstance(obj, dict):
        items = list(obj.items())
    elif isinstance(obj, list):
        items = list(enumerate(obj))
    else:
        return
    for key, value in items:
        yield prefix + (key,)
        yield from all_paths(value, prefix + (key,))


def get_at(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def structural(path) -> bool:
    return not any(path[: len(p)] == p for p in INFORMATIONAL)


def wrong_type(value, rng):
    if isinstance(value, bool):
        options = ["true", [value], {"v": value}]
    elif isinstance(value, int):
        options = [str(value), value + 0.5, [value], {"v": value}, True]
    elif isinstance(value, float):
        options = [str(value), [value], {"v": value}, True, None]
    elif isinstance(value, str):
        options = [7, [value], {"v": value}, None, True]
    elif isinstance(value, list):
        options = ["x", 7, {"v": 1}, None]
    elif isinstance(value, dict):
        options = ["x", 7, [1], None]
    else:  # None
        options = ["x", [], {"v": 1}, 1.5, True]
    return rng.choice(options)


def required_paths(m: dict, kind: str, rng) -> list[tuple]:
    main_file = ADA if kind == "adapter" else EMU
    paths = [("format",), ("format_version",), ("files",), ("files", main_file), ("files", main_file, "sha256"),
             ("files", main_file, "tensors"), ("model_type",), ("base",), ("base", "num_layers"),
             ("base", "fingerprint"), ("adapter",), ("adapter", "k"), ("adapter", "bottom"), ("adapter", "top")]
    if kind != "adapter":
        i = rng.randrange(len(m["slots"]))
        paths += [("files", CFG), ("method",), ("keep_requested",), ("size",), ("slots",), ("slots", i, "source"),
                  ("slots", i, "role"), ("files", CFG, "sha256")]
        paths += [("size", f) for f in ("middle_params_original", "middle_params_kept", "emulator_depth", "keep_achieved",
                                        "emulator_params")]
    return paths


def corrupt_manifest(folder: Path, kind: str, rng) -> tuple[str, bool]:
    m = read_manifest(folder)
    family = rng.choice(["delete", "type", "huge", "ranks", "shares", "traversal", "version", "garbage", "free",
                         "type", "delete", "dimensions", "dimensions"])
    if family == "ranks" and kind != "svd":
        family = "type"
    if family == "dimensions" and kind == "adapter":
        family = "huge"
    if family == "shares" and kind == "adapter":
        family = "huge"
    must = True
    if family == "delete":
        path = rng.choice(required_paths(m, kind, rng))
        del get_at(m, path[:-1])[path[-1]]
        desc = f"delete {path}"
    elif family == "type":
        path = rng.choice([p for p in all_paths(m) if structural(p)])
        parent = get_at(m, path[:-1])
        parent[path[-1]] = value = wrong_type(parent[path[-1]], rng)
        desc = f"{path} = {value!r}"
    elif family == "huge":
        numeric = [p for p in all_paths(m) if structural(p) and type(get_at(m, p)) in (int, float)]
        path = rng.choice(numeric)
        value = rng.choice([10**30, 2**63, 2**64 + 1, 1e308, -(10**30), -1, 10**6])
        if path == ("size", "emulator_params") and value > 0:  # an informational count: any size is valid
            value = -1
        get_at(m, path[:-1])[path[-1]] = value
        desc = f"{path} = {value!r}"
    elif family == "ranks":
        slot = rng.choice([s for s in m["slots"] if s["ranks"]])
        name = rng.choice(sorted(slot["ranks"]))
        slot["ranks"][name] = value = rng.choice([-5, -1, 0, 10**30, 10**6])
        desc = f"rank of {name} = {value}"
    elif family == "dimensions":
        desc = corrupt_slot_dimensions(m, rng)
    elif family == "shares":
        n = len(m["slots"])
        pos = rng.randrange(2, n - 2)
        target = rng.choice([pos, rng.randrange(pos, n), 0, n - 1, n + 3, -1])
        m["slots"][pos]["shares"] = target
        desc = f"slots[{pos}].shares = {target}"
    elif family == "traversal":
        name = rng.choice(["../" + EMU, "/etc/passwd", "../../x", "sub/" + CFG, "..", ".", "", "a\x00b", "./" + MAN,
                           "~/.ssh/id_rsa", "/" + EMU])
        main_file = ADA if kind == "adapter" else EMU
        if rng.random() < 0.5:
            m["files"][name] = m["files"].pop(main_file)
        else:
            m["files"][name] = {"sha256": "0" * 64}
        desc = f"file name {name!r}"
    elif family == "version":
        m["format_version"] = value = rng.choice([0, 2, -1, "1", 1.0, True, None, [1], 10**30])
        desc = f"format_version = {value!r}"
    elif family == "garbage":
        text = json.dumps(m)
        choice = rng.choice(["random", "truncated", "array", "null", "string", "deep", "utf8", "empty", "nan"])
        data = {
            "random": bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))),
            "truncated": text[: rng.randrange(1, len(text))].encode(),
            "array": b"[]", "null": b"null", "string": b'"gradot"', "deep": b"[" * 200_000,
            "utf8": b'{"format": "\xff\xfe"}', "empty": b"",
            "nan": text.replace('"format_version": 1', '"format_version": NaN').encode(),
        }[choice]
        (folder / MAN).write_bytes(data)
        return f"garbage manifest ({choice})", True
    else:  # free: anything anywhere, valid-looking values included
        path = rng.choice(list(all_paths(m)))
        parent = get_at(m, path[:-1])
        if rng.random() < 0.3 and isinstance(parent, dict):
            del parent[path[-1]]
            desc = f"free: delete {path}"
        else:
            parent[path[-1]] = value = rng.choice([None, 0, 1, -1, 2, "x", "llama", [], {}, [0, 1], 0.5, 10**9])
            desc = f"free: {path} = {value!r}"
        must = False
    write_manifest(folder, m)
    return f"manifest {family}: {desc}", must


#: Beyond every width of the tiny Llama (hidden 32, MLP 64): a rank above min(out, in) of any of its
#: linears, more channels than its MLP has.
_TOO_WIDE = {"rank": (33, 2**18, 10**6), "channels": (65, 2**21, 10**6)}


def corrupt_slot_dimensions(m: dict, rng) -> str:
    """A slot stating a dimension beyond the config's widths, a harmonizer span overlapping the next
    slot's layer, or a middle layer shipped twice: each must be refused."""
    slots = m["slots"]
    k = m["adapter"]["k"]
    middle = [pos for pos in range(k, len(slots) - k) if slots[pos].get("shares") is None]
    pos = rng.choice(middle)
    slot = slots[pos]
    later = [p for p in middle if p > pos]
    what = rng.choice(["channels", "rank", "rank", "harmonizer", "span", "source"])
    if what == "channels":
        slot["channels"] = value = rng.choice(_TOO_WIDE["channels"])
        return f"slots[{pos}].channels = {value}"
    if what in ("rank", "harmonizer"):
        name = rng.choice(["self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.up_proj"])
        slot.setdefault("ranks", {})[name] = value = rng.choice(_TOO_WIDE["rank"])
        if what == "harmonizer":  # a harmonizer claiming the campaign's widths
            slot["channels"] = rng.choice(_TOO_WIDE["channels"])
            slot["replaces"] = [slot["source"]]
        return f"slots[{pos}] ({what}) rank of {name} = {value}"
    if what == "span" and later:  # a harmonizer span reaching the next own-weight slot's layer
        slot["replaces"] = list(range(slot["source"], slots[later[0]]["source"] + 1))
        return f"slots[{pos}].replaces = {slot['replaces']}"
    if later:  # the next own-weight slot ships this slot's layer again
        slots[later[0]]["source"] = slot["source"]
        return f"slots[{later[0]}].source = {slot['source']} (as slots[{pos}])"
    slot["channels"] = 2**21
    return f"slots[{pos}].channels = {2**21}"


def corrupt_tokenizer_chain(folder: Path, rng) -> tuple[str, bool]:
    """A random normalizer or pre-tokenizer chain: refused by the static bounds or the probe, or, when
    its growth is modest, loaded and usable; never a traceback, a hang or a blow-up."""
    def replace():
        content = "".join(rng.choice("qxé中 ") for _ in range(rng.randint(0, 8)))
        pattern = ({"String": rng.choice("qaxé ")} if rng.random() < 0.6
                   else {"Regex": rng.choice(["q", "q?", "[a-z]", "\\s+"])})
        return {"type": "Replace", "pattern": pattern, "content": content}

    normalizers = [replace, lambda: {"type": "NFKC"}, lambda: {"type": "Lowercase"}, lambda: {"type": "NFD"},
                   lambda: {"type": "Prepend", "prepend": "_"}, lambda: {"type": "Strip", "left": True, "right": True}]
    pre_tokenizers = [lambda: {"type": "Whitespace"}, lambda: {"type": "Digits", "individual_digits": True},
                      lambda: {"type": "Punctuation", "behavior": "Isolated"},
                      lambda: {"type": "Split", "pattern": {"Regex": rng.choice(["\\s+", "[a-z]+", "\\d"])},
                               "behavior": "Isolated", "invert": False}]
    part = rng.choice(["normalizer", "pre_tokenizer"])
    count = rng.choice([1, 2, 3, 5, 8, 17, 22, 40])
    rules = [rng.choice(normalizers if part == "normalizer" else pre_tokenizers)() for _ in range(count)]
    key = "normalizers" if part == "normalizer" else "pretokenizers"
    _edit_tokenizer(folder, lambda t: t.update({part: {"type": "Sequence", key: rules}}))
    return f"tokenizer {part} chain of {count} rules", count > 16


def corrupt_safetensors(folder: Path, name: str, rng) -> tuple[str, bool]:
    path = folder / name
    data = bytearray(path.read_bytes())
    n, head = header(bytes(data))
    family = rng.choice(["length", "header", "truncate", "append", "edit", "nan", "body", "pickle"])
    must = True
    if family == "length":
        i = rng.randrange(8)
        data[i] ^= rng.randrange(1, 256)
        desc = f"header length byte {i}"
    elif family == "header":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(8, 8 + n)] ^= rng.randrange(1, 256)
        desc = "header bytes"
        try:  # a flipped padding space may become other whitespace, or the flip may hit the free-form
            # metadata: the tensors are then described as before, and only the hash can tell
            strip = lambda h: {k: v for k, v in h.items() if k != "__metadata__"}  # noqa: E731
            same = header(bytes(data))[0] == n and strip(header(bytes(data))[1]) == strip(head)
        except (ValueError, UnicodeDecodeError, struct.error):
            same = False
        must = None if same else True
    elif family == "truncate":
        cut = rng.randrange(len(data))
        data = data[:cut]
        desc = f"truncated at {cut} of {len(path.read_bytes())}"
    elif family == "append":
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        desc = "junk appended"
    elif family == "edit":
        key = rng.choice(sorted(k for k in head if k != "__metadata__"))
        field = rng.choice(["dtype", "shape", "offsets", "delete", "rename", "add"])
        if field == "dtype":
            head[key]["dtype"] = rng.choice(["F16", "I64", "BOOL", "XX", "F8_E4M3", "U8", 5])
        elif field == "shape":
            head[key]["shape"] = rng.choice([[], [10**12, 10**12], [-1], [0], ["a"], [2**64], [1, 2, 3]])
        elif field == "offsets":
            head[key]["data_offsets"] = rng.choice([[0, 10**15], [5, 3], [-1, 4], [0], None, [0, 2**64]])
        elif field == "delete":
            del head[key]
        elif field == "rename":
            head[key + ".smuggled"] = head.pop(key)
        else:
            head["model.layers.99.mlp.up_proj.weight"] = dict(head[key])
        raw = json.dumps(head).encode()
        data = bytearray(struct.pack("<Q", len(raw)) + raw + bytes(data[8 + n :]))
        desc = f"header edit: {field} of {key}"
    elif family == "nan":
        key = rng.choice(sorted(k for k in head if k != "__metadata__" and head[k]["dtype"] == "F32"))
        start, end = head[key]["data_offsets"]
        at = 8 + n + start + 4 * rng.randrange((end - start) // 4)
        data[at : at + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), float("-inf")]))
        desc = f"non-finite value in {key}"
    elif family == "body":
        for _ in range(rng.randint(1, 16)):
            data[rng.randrange(8 + n, len(data))] ^= rng.randrange(1, 256)
        desc = "weight bytes flipped"
        must = None  # decided below: only the hash can tell
    else:
        data = bytearray(pickle.dumps({"weights": [1.0, 2.0]}))
        desc = "replaced by a pickle"
    path.write_bytes(bytes(data))
    rehashed = rng.random() < 0.5
    if rehashed:
        rehash(folder, name)
    if must is None:
        must = not rehashed
    return f"{name} {family}: {desc}{' (re-hashed)' if rehashed else ''}", must


def corrupt_config(folder: Path, rng) -> tuple[str, bool]:
    config = json.loads((folder / CFG).read_text())
    choice = rng.choice(["bert", "no model_type", "opt", "heads 0", "kv heads 0", "hidden str", "vocab huge",
                         "hidden huge", "hidden negative", "layers", "garbage", "array"])
    updates = {
        "bert": {"model_type": "bert"}, "opt": {"model_type": "opt"}, "heads 0": {"num_attention_heads": 0},
        "kv heads 0": {"num_key_value_heads": 0}, "hidden str": {"hidden_size": "x"},
        "vocab huge": {"vocab_size": 10**12}, "hidden negative": {"hidden_size": -32},
        "hidden huge": {"hidden_size": 10**12, "num_attention_heads": 1, "num_key_value_heads": 1},
        "layers": {"num_hidden_layers": config["num_hidden_layers"] + 1},
    }
    if choice in updates:
        config.update(updates[choice])
        (folder / CFG).write_text(json.dumps(config))
    elif choice == "no model_type":
        del config["model_type"]
        (folder / CFG).write_text(json.dumps(config))
    else:
        (folder / CFG).write_bytes(b"\xff{not json" if choice == "garbage" else b"[1, 2]")
    rehashed = rng.random() < 0.5
    if rehashed:
        rehash(folder, CFG)
    return f"config {choice}{' (re-hashed)' if rehashed else ''}", True


def corrupt_tokenizer(folder: Path, rng) -> tuple[str, bool]:
    """Cut or mutate a shipped tokenizer file; re-hashed, some mutations leave a usable tokenizer."""
    name = rng.choice(["tokenizer.json", "tokenizer_config.json"])
    text = (folder / name).read_text()
    if rng.random() < 0.25:
        (folder / name).write_text(text[: rng.randrange(len(text))])
        desc = "truncated"
    else:
        obj = json.loads(text)
        path = rng.choice(list(all_paths(obj)))
        parent = get_at(obj, path[:-1])
        if isinstance(parent, dict) and rng.random() < 0.3:
            del parent[path[-1]]
            desc = f"delete {path}"
        else:
            parent[path[-1]] = value = rng.choice([None, 0, -1, "x", [], {}, 10**30, True, [1, "a"]])
            desc = f"{path} = {value!r}"
        (folder / name).write_text(json.dumps(obj))
    rehashed = rng.random() < 0.5
    if rehashed:
        rehash(folder, name)
    return f"{name} {desc}{' (re-hashed)' if rehashed else ''}", not rehashed


def corrupt_file_type(folder: Path, kind: str, rng) -> tuple[str, bool]:
    """A file of the artifact replaced by a link to a device, a FIFO, a directory, or an oversized file."""
    names = [MAN, ADA if kind == "adapter" else EMU] + ([CFG] if kind != "adapter" else [])
    name, what = rng.choice(names), rng.choice(["/dev/zero", "/dev/urandom", "fifo", "directory", "oversized"])
    path = folder / name
    path.unlink()
    if what.startswith("/dev/"):
        path.symlink_to(what)
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "directory":
        path.mkdir()
    else:  # sparse: only its size is real
        with open(path, "wb") as f:
            f.truncate(300 << 20)
    return f"{name} is {what}", True


def corrupt_big_number(folder: Path, kind: str, rng) -> tuple[str, bool]:
    """A 5000-digit integer (beyond Python's int-string limit) or 1e400 in a manifest or config."""
    name = rng.choice([MAN, MAN] + ([CFG] if kind != "adapter" else []))
    text = (folder / name).read_text()
    spots = [m.span(1) for m in re.finditer(r'": (-?\d+)[,}\n]', text)]
    start, end = rng.choice(spots)
    value = rng.choice(["9" * 5000, "-" + "1" * 4500, "1e400", "1" + "0" * 400])
    (folder / name).write_text(text[:start] + value + text[end:])
    if name == CFG:
        rehash(folder, CFG)
    # 1e400 reads as inf, and a 401-digit integer parses: in an informational field they may be valid
    return f"{name}: {text[start:end]} -> {value[:12]}… ({len(value)} chars)", len(value) > 4300


def corrupt_split_claim(folder: Path, model, rng) -> tuple[str, bool]:
    """An adapter claiming another split than the owner's k = 2."""
    choice = rng.choice(["k=3, fingerprint recomputed", "k=1", "k=3"])
    if choice.startswith("k=3,"):
        shutil.rmtree(folder)
        _hostile_k3_adapter(model, folder)
        return f"split claim {choice}", True
    k = int(choice[2])
    m = read_manifest(folder)
    m["adapter"] = {"k": k, "bottom": list(range(k)), "top": list(range(LAYERS - k, LAYERS))}
    write_manifest(folder, m)
    return f"split claim {choice}", True


def corrupt_tokenizer_attack(folder: Path, rng) -> tuple[str, bool]:
    # the slow regex spends the probe's 10 CPU seconds: tested on its own, not repeated here
    label = rng.choice(sorted(set(TOKENIZER_ATTACKS) - {"slow split regex"}))
    _edit_tokenizer(folder, TOKENIZER_ATTACKS[label][0])
    return f"tokenizer attack: {label}", True


FUZZ_CASES = int(os.environ.get("GRADOT_FUZZ_CASES", "150"))
FUZZ_SEED = int(os.environ.get("GRADOT_FUZZ_SEED", "20251122"))
#: Peak-RSS growth the whole fuzz may cause: hostile files must be refused before they are read.
FUZZ_MEMORY_MB = 1024


def test_fuzzed_artifacts_always_end_in_a_clean_refusal(shipped, tmp_path, capsys, monkeypatch):
    model, dirs = shipped
    monkeypatch.setenv("GRADOT_CACHE", str(tmp_path / "cache"))  # the tokenizer probe's verdicts
    rng = random.Random(FUZZ_SEED)
    tokens = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    failures, refused, loaded = [], 0, 0
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for case in range(FUZZ_CASES):
        kind = rng.choice(["uniform", "crash", "svd", "adapter"])
        folder = copy_of(dirs[kind], tmp_path / f"case{case}")
        target = rng.choice(["manifest", "manifest", "tensors", "tensors", "file type", "big number"]
                            + (["config"] if kind != "adapter" else []) + (["split claim"] if kind == "adapter" else [])
                            + (["tokenizer", "tokenizer attack", "tokenizer chain"] if kind == "uniform" else []))
        if target == "file type":
            desc, must = corrupt_file_type(folder, kind, rng)
        elif target == "big number":
            desc, must = corrupt_big_number(folder, kind, rng)
        elif target == "split claim":
            desc, must = corrupt_split_claim(folder, model, rng)
        elif target == "tokenizer attack":
            desc, must = corrupt_tokenizer_attack(folder, rng)
        elif target == "tokenizer chain":
            desc, must = corrupt_tokenizer_chain(folder, rng)
        elif target == "manifest":
            desc, must = corrupt_manifest(folder, kind, rng)
        elif target == "tensors":
            desc, must = corrupt_safetensors(folder, ADA if kind == "adapter" else EMU, rng)
        elif target == "config":
            desc, must = corrupt_config(folder, rng)
        else:
            desc, must = corrupt_tokenizer(folder, rng)
        label = f"case {case} ({kind}) {desc}"
        try:
            with time_limit(60 if target.startswith("tokenizer") else 20):  # the probe: up to 10 s of CPU
                result = load(model, kind, folder)
                if kind != "adapter":
                    with torch.no_grad():
                        result.model(input_ids=tokens)
                if kind == "uniform":  # the emulator that ships its tokenizer
                    load_emulator_tokenizer(folder)("the cat sat on the mat")
            loaded += 1
            if must:
                failures.append(f"{label}: accepted")
        except ArtifactError as exc:
            refused += 1
            if "\n" in str(exc) or str(folder) not in str(exc):
                failures.append(f"{label}: unclear message {str(exc)!r}")
        except (Exception, CaseTimeout) as exc:  # noqa: BLE001 - the point is to catch anything else
            failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
        if target != "tokenizer":  # `gradot info` verifies the same files: 0 or a one-line error
            with time_limit(20):
                code = main(["info", str(folder)])
            err = capsys.readouterr().err
            # info reads no weight values and knows no model: it may pass what only loading refuses
            info_must = (must and target not in ("split claim", "tokenizer attack", "tokenizer chain")
                         and " nan:" not in desc)
            if code not in (0, 2) or (code == 2 and err.count("\n") != 1) or (info_must and code == 0):
                failures.append(f"{label}: gradot info exited {code}: {err!r}")
        shutil.rmtree(folder)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) // 1024
    print(f"fuzz: {FUZZ_CASES} cases, {refused} refused, {loaded} loaded (corruptions that leave a valid artifact); "
          f"peak memory grew by {grew} MB")
    assert not failures, f"{len(failures)} of {FUZZ_CASES} cases:\n" + "\n".join(failures[:30])
    assert refused > FUZZ_CASES * 0.8, (refused, loaded)
    assert grew < FUZZ_MEMORY_MB, f"peak memory grew by {grew} MB over the fuzz cases"


# --------------------------------------------------------------------------------------------- refusals


@pytest.fixture
def emulator_dir(shipped, tmp_path):
    return copy_of(shipped[1]["uniform"], tmp_path / "emu")


@pytest.fixture
def adapter_dir(shipped, tmp_path):
    return copy_of(shipped[1]["adapter"], tmp_path / "adapter")


class Evil:
    """A pickle payload that would leave a mark if anything ever unpickled it."""

    marker: Path

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def test_pickles_are_never_loaded(shipped, emulator_dir, adapter_dir, tmp_path, monkeypatch):
    model, _ = shipped
    evil = Evil()
    evil.marker = tmp_path / "PWNED"
    payload = pickle.dumps(evil)
    for folder in (emulator_dir, adapter_dir):
        torch.save({"model.layers.0.mlp.up_proj.weight": torch.zeros(2)}, folder / "pytorch_model.bin")
        for name in ("model.pt", "adapter.bin", "training_args.bin", "optimizer.pt"):
            (folder / name).write_bytes(payload)

    def refuse(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    for target, attr in [(torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")]:
        monkeypatch.setattr(target, attr, refuse)
    emu = load_emulator(emulator_dir)  # the pickles next to the artifact are ignored
    assert emu.model is not None
    plug_in(copy.deepcopy(model), adapter_dir)
    # A pickle under the name of the safetensors file (hash updated) is refused, still not unpickled.
    shutil.copy(emulator_dir / "model.pt", emulator_dir / EMU)
    rehash(emulator_dir, EMU)
    with pytest.raises(ArtifactError, match="emulator.safetensors: not a readable safetensors file") as exc:
        load_emulator(emulator_dir)
    assert_clean(exc.value, emulator_dir)
    shutil.copy(adapter_dir / "adapter.bin", adapter_dir / ADA)
    rehash(adapter_dir, ADA)
    with pytest.raises(ArtifactError, match="adapter.safetensors: not a readable safetensors file"):
        plug_in(copy.deepcopy(model), adapter_dir)
    # Only a pickle left: the safetensors file is required.
    (emulator_dir / EMU).unlink()
    with pytest.raises(ArtifactError, match="emulator.safetensors: missing"):
        load_emulator(emulator_dir)
    assert not evil.marker.exists()


def test_shipped_tokenizer_reads_only_listed_files(emulator_dir):
    reference = load_emulator_tokenizer(emulator_dir)("the cat sat").input_ids
    # Files the manifest does not list are never read, even where transformers would pick them up.
    (emulator_dir / "added_tokens.json").write_text(json.dumps({"cat": 5000}))
    (emulator_dir / "chat_template.jinja").write_text("{{ 'injected' }}")
    tok = load_emulator_tokenizer(emulator_dir)
    assert tok("the cat sat").input_ids == reference
    assert not getattr(tok, "chat_template", None)
    # A listed tokenizer file that was changed is refused.
    config = json.loads((emulator_dir / "tokenizer_config.json").read_text())
    config["model_max_length"] = 7
    (emulator_dir / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="tokenizer_config.json: content hash does not match the manifest"):
        load_emulator_tokenizer(emulator_dir)


def _add_tensor(folder: Path, name: str, key: str, tensor: torch.Tensor, list_it: bool) -> None:
    tensors = read_st(folder / name)
    tensors[key] = tensor
    save_file(tensors, folder / name)
    rehash(folder, name)
    if list_it:
        m = read_manifest(folder)
        m["files"][name]["tensors"][key] = {"dtype": "float32", "shape": list(tensor.shape)}
        write_manifest(folder, m)


def test_tensors_the_manifest_does_not_list_are_refused(shipped, emulator_dir, adapter_dir):
    model, _ = shipped
    _add_tensor(emulator_dir, EMU, "model.layers.9.mlp.up_proj.weight", torch.zeros(64, 32), list_it=False)
    with pytest.raises(ArtifactError, match=r"emulator.safetensors: tensors not listed in the manifest: "
                                            r"model.layers.9.mlp.up_proj.weight") as exc:
        load_emulator(emulator_dir)
    assert_clean(exc.value, emulator_dir)
    # Listed as well: still not part of the emulator's architecture.
    _add_tensor(emulator_dir, EMU, "model.layers.9.mlp.up_proj.weight", torch.zeros(64, 32), list_it=True)
    with pytest.raises(ArtifactError, match=r"tensors do not match the emulator architecture: "
                                            r"\['model.layers.9.mlp.up_proj.weight'\]"):
        load_emulator(emulator_dir)
    # An adapter smuggling a middle layer's weights, unlisted.
    _add_tensor(adapter_dir, ADA, "model.layers.3.mlp.up_proj.weight", torch.zeros(64, 32), list_it=False)
    with pytest.raises(ArtifactError, match=r"adapter.safetensors: tensors not listed in the manifest: "
                                            r"model.layers.3.mlp.up_proj.weight") as exc:
        plug_in(copy.deepcopy(model), adapter_dir)
    assert_clean(exc.value, adapter_dir)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(shipped, emulator_dir, adapter_dir, value):
    model, _ = shipped
    for folder, name, key in [(emulator_dir, EMU, "model.layers.2.mlp.down_proj.weight"),
                              (adapter_dir, ADA, "model.layers.7.self_attn.q_proj.weight")]:
        tensors = read_st(folder / name)
        tensors[key][3, 5] = value
        save_file(tensors, folder / name)
        rehash(folder, name)
        with pytest.raises(ArtifactError, match=f"{name}: tensor {key} contains NaN or Inf") as exc:
            load(model, "adapter" if name == ADA else "emulator", folder)
        assert_clean(exc.value, folder)


def test_truncated_files_are_refused(shipped, emulator_dir, adapter_dir):
    model, _ = shipped
    f = emulator_dir / EMU
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="emulator.safetensors: content hash does not match the manifest"):
        load_emulator(emulator_dir)
    rehash(emulator_dir, EMU)  # even with a matching hash, the file itself is incomplete
    with pytest.raises(ArtifactError, match="emulator.safetensors: not a readable safetensors file"):
        load_emulator(emulator_dir)
    f = adapter_dir / ADA
    f.write_bytes(f.read_bytes()[:7])
    rehash(adapter_dir, ADA)
    with pytest.raises(ArtifactError, match="adapter.safetensors: not a readable safetensors file"):
        plug_in(copy.deepcopy(model), adapter_dir)
    m = adapter_dir / MAN
    m.write_text(m.read_text()[:-40])
    with pytest.raises(ArtifactError, match="manifest.json: not valid JSON") as exc:
        plug_in(copy.deepcopy(model), adapter_dir)
    assert_clean(exc.value, adapter_dir)


@pytest.mark.parametrize("name", ["../emulator.safetensors", "/etc/passwd", "sub/config.json", "..", "a\x00b",
                                  "./manifest.json"])
def test_manifest_naming_paths_outside_its_directory_is_refused(shipped, emulator_dir, adapter_dir, name):
    model, _ = shipped
    for folder, main_file in [(emulator_dir, EMU), (adapter_dir, ADA)]:
        m = read_manifest(folder)
        m["files"][name] = m["files"].pop(main_file)
        write_manifest(folder, m)
        with pytest.raises(ArtifactError, match="points outside the artifact directory") as exc:
            load(model, "adapter" if main_file == ADA else "emulator", folder)
        assert_clean(exc.value, folder)


def test_symbolic_links_are_refused(shipped, emulator_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(emulator_dir / EMU, outside)
    (emulator_dir / EMU).symlink_to(outside)  # same bytes, same hash, but it lives outside
    with pytest.raises(ArtifactError, match="emulator.safetensors: is a symbolic link"):
        load_emulator(emulator_dir)


@pytest.mark.parametrize("version", [0, 2, "1", 1.0, True, None])
def test_wrong_format_version_is_refused(shipped, emulator_dir, adapter_dir, version):
    model, _ = shipped
    for folder, kind in [(emulator_dir, "emulator"), (adapter_dir, "adapter")]:
        m = read_manifest(folder)
        if version is None:
            del m["format_version"]
        else:
            m["format_version"] = version
        write_manifest(folder, m)
        with pytest.raises(ArtifactError, match=rf"format_version {version!r} is not supported \(expected 1\)") as exc:
            load(model, kind, folder)
        assert_clean(exc.value, folder)


def test_wrong_kind_of_artifact_is_refused(shipped, emulator_dir, adapter_dir):
    model, _ = shipped
    with pytest.raises(ArtifactError, match="format is 'gradot-emulator', expected 'gradot-adapter'"):
        plug_in(copy.deepcopy(model), emulator_dir)
    with pytest.raises(ArtifactError, match="format is 'gradot-adapter', expected 'gradot-emulator'"):
        load_emulator(adapter_dir)


@pytest.mark.parametrize("field,value,message", [
    (("slots", 3, "shares"), 5, r"'slots\[3\].shares' is 5, expected null or an earlier middle position"),
    (("slots", 3, "role"), "adapter", r"'slots\[3\].role' is 'adapter', expected 'middle'"),
    (("slots", 0, "source"), 3, r"'slots\[0\].source' is 3, expected adapter layer 0"),
    (("adapter", "k"), 4, r"'adapter.k' is 4, expected a positive integer with 2k \+ 1 <= 8 layers"),
    (("dtype",), "int8", r"'dtype' is 'int8', expected one of float32"),
    (("size", "keep_achieved"), 0.9, r"'size.keep_achieved' is 0.9, expected middle_params_kept"),
    (("base", "fingerprint"), "abc", r"'base.fingerprint' is 'abc', expected a sha256 hex digest"),
])
def test_inconsistent_manifest_fields_are_refused(emulator_dir, field, value, message):
    m = read_manifest(emulator_dir)
    get_at(m, field[:-1])[field[-1]] = value
    write_manifest(emulator_dir, m)
    with pytest.raises(ArtifactError, match=message) as exc:
        load_emulator(emulator_dir)
    assert_clean(exc.value, emulator_dir)


def test_config_that_does_not_fit_the_tensors_allocates_nothing(emulator_dir):
    """A config claiming a huge model is checked against the stored tensors on the meta device."""
    config = json.loads((emulator_dir / CFG).read_text())
    config["vocab_size"] = 10**12
    (emulator_dir / CFG).write_text(json.dumps(config))
    rehash(emulator_dir, CFG)
    with pytest.raises(ArtifactError, match=r"tensor model.embed_tokens.weight has shape \[128, 32\], the architecture "
                                            r"of config.json and the manifest's slots needs \[1000000000000, 32\]"):
        with time_limit(20):
            load_emulator(emulator_dir)


# --------------------------------------------------------------------------------------------- failed writes


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@pytest.mark.parametrize("interruption", [OSError("No space left on device"), KeyboardInterrupt()])
def test_a_write_failing_midway_leaves_the_existing_directory_untouched(shipped, emulator_dir, monkeypatch,
                                                                        interruption):
    model, _ = shipped
    before = snapshot(emulator_dir)
    real_save = artifacts.files.save_file

    def fail_midway(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:100])  # half-written ...
        raise interruption  # ... when the disk fills up or the user presses Ctrl-C

    monkeypatch.setattr(artifacts.files, "save_file", fail_midway)
    emu = uniform_emulator(model, split_model(model, 2), 0.25)
    with pytest.raises(type(interruption)):
        save_emulator(emu, emulator_dir, overwrite=True)
    assert snapshot(emulator_dir) == before
    assert leftovers(emulator_dir) == []
    load_emulator(emulator_dir)


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line(code: int, err: str, message: str) -> None:
    """Exit code 2 and exactly one line on stderr besides progress bars (which redraw with \\r)."""
    assert code == 2, err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line and "it/s]" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("gradot ") and ": error: " in lines[0], err
    assert message in lines[0], err


def test_failed_compress_and_plugin_leave_the_existing_output_untouched(tiny_model_dir, shipped, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "precious.txt").write_text("results of last week")
    (existing / "sub").mkdir()
    (existing / "sub" / "weights.bin").write_bytes(b"\x00\x01")
    before = snapshot(existing)
    short = tmp_path / "short.txt"
    short.write_text("the cat sat on the mat")
    code, _, err = run_cli(capsys, "compress", "--model", tiny_model_dir, "--method", "crash", "--calib", short,
                           "--calib-sequences", "4", "--calib-len", "16", "--out", existing, "--overwrite")
    assert_one_line(code, err, "calibration text")
    assert snapshot(existing) == before and leftovers(existing) == []
    # Plug-in of an adapter trained for another model, over an existing output.
    code, _, err = run_cli(capsys, "plugin", "--model", tiny_model_dir, "--adapter", shipped[1]["adapter"],
                           "--out", existing, "--overwrite")
    assert_one_line(code, err, "adapter holds layers [0, 1, 6, 7], this model's k=2 adapter is layers [0, 1, 4, 5]")
    assert snapshot(existing) == before and leftovers(existing) == []


# --------------------------------------------------------------------------------------------- bad CLI input


@pytest.fixture
def bert_dir(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, is_decoder=True)
    folder = tmp_path / "tiny-bert"
    BertLMHeadModel(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_unknown_model_and_unsupported_architecture(bert_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", "--model", "no-such-model", "--out", tmp_path / "e")
    assert_one_line(code, err, "unknown model 'no-such-model'")
    code, _, err = run_cli(capsys, "compress", "--model", tmp_path / "missing.gguf", "--out", tmp_path / "e")
    assert_one_line(code, err, "unknown model")
    (tmp_path / "empty-folder").mkdir()
    code, _, err = run_cli(capsys, "compress", "--model", tmp_path / "empty-folder", "--out", tmp_path / "e")
    assert_one_line(code, err, "expected 'default', a local model folder with config.json")
    code, _, err = run_cli(capsys, "compress", "--model", bert_dir, "--out", tmp_path / "e")
    assert_one_line(code, err, "unsupported architecture 'bert'")
    code, _, err = run_cli(capsys, "plugin", "--model", bert_dir, "--adapter", tmp_path, "--out", tmp_path / "p")
    assert_one_line(code, err, "unsupported architecture 'bert'")
    assert not (tmp_path / "e").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize("keep", ["0", "-0.1", "1.0001", "nan", "inf", "abc", ""])
def test_keep_outside_the_unit_interval(keep, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--keep", keep, "--out", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # argparse prints the usage, then the one-line error
    assert last.startswith("gradot compress: error: argument --keep: --keep must be"), err
    assert "Traceback" not in err


def test_too_few_layers_for_the_adapter_split(tiny_model_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "compress", "--model", tiny_model_dir, "--adapter-layers", "3",
                           "--out", tmp_path / "e")
    assert_one_line(code, err, "model has 6 decoder layers; an adapter of k=3 bottom and top layers needs at least 7")
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--model", str(tiny_model_dir), "--adapter-layers", "0", "--out", str(tmp_path / "e")])
    assert exc.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("method", ["crash", "gradot"])
def test_empty_short_missing_or_malformed_calibration_text(method, tiny_model_dir, tmp_path, capsys):
    cases = {
        "empty.txt": (" \n\n  \t", "calibration file is empty"),
        "short.txt": ("the cat sat on the mat", "has 6 tokens; 4 x 16 = 64 needed"),
        "bad.jsonl": ('{"text": "the cat"}\n{"title": "no text field"}\n', "bad.jsonl:2: expected a JSON object with a 'text' field"),
        "missing.txt": (None, "calibration file not found"),
        "null.jsonl": ('{"text": null}\n', "null.jsonl:1: 'text' is NoneType, expected a string"),
        "alpaca.json": ('[{"instruction": "x", "output": "y"}]', "not a .json file"),
        "latin1.txt": (b"caf\xe9 " * 40, "not UTF-8 text (byte 3)"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        code, _, err = run_cli(capsys, "compress", "--model", tiny_model_dir, "--method", method, "--calib", path,
                               "--calib-sequences", "4", "--calib-len", "16", "--out", tmp_path / "e")
        assert_one_line(code, err, message)
    assert not (tmp_path / "e").exists()


def test_model_and_adapter_mismatch_at_plugin(tiny_model_dir, shipped, tmp_path, capsys):
    # An adapter fine-tuned on an emulator of another checkpoint of the same architecture.
    other = tiny_model("llama", seed=7)
    emu = uniform_emulator(other, split_model(other, 2), 0.5)
    save_adapter(emu, tmp_path / "foreign")
    code, _, err = run_cli(capsys, "plugin", "--model", tiny_model_dir, "--adapter", tmp_path / "foreign",
                           "--out", tmp_path / "p")
    assert_one_line(code, err, "base-model fingerprint does not match this model")
    # An emulator passed where the adapter belongs.
    code, _, err = run_cli(capsys, "plugin", "--model", tiny_model_dir, "--adapter", shipped[1]["uniform"],
                           "--out", tmp_path / "p")
    assert_one_line(code, err, "format is 'gradot-emulator', expected 'gradot-adapter'")
    # An adapter for another architecture.
    opt = tiny_model("opt")
    save_adapter(uniform_emulator(opt, split_model(opt, 2), 0.5), tmp_path / "opt-adapter")
    code, _, err = run_cli(capsys, "plugin", "--model", tiny_model_dir, "--adapter", tmp_path / "opt-adapter",
                           "--out", tmp_path / "p")
    assert_one_line(code, err, "adapter is for a 'opt' model, this model is 'llama'")
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------------------------- privacy measures


def test_privacy_measure_of_layer_drop_and_full_copy():
    from gradot.analysis.privacy import measure

    model = tiny_model("llama", layers=LAYERS)
    split = split_model(model, 2)
    full = uniform_emulator(model, split, 1.0)
    r = measure(model, full.model, full.manifest, split.middle)
    assert r.mean_own_error == 0 and r.exact_fraction == 1 and set(r.layer_status.values()) == {"kept"}
    half = uniform_emulator(model, split, 0.5)
    r = measure(model, half.model, half.manifest, split.middle)
    kept = {s["source"] for s in half.manifest["slots"] if s["role"] == "middle"}
    for m in r.matrices:
        assert m.own_error == (0.0 if m.layer in kept else 1.0), m
        assert m.best_error <= m.own_error
    assert r.exact_fraction == pytest.approx(half.manifest["size"]["keep_achieved"])
    assert {r.layer_status[i] for i in kept} == {"kept"} and r.layer_status[3] == "nothing"


def test_privacy_measure_of_low_rank_and_pruned_matrices():
    from gradot.analysis.privacy import measure
    from gradot.registry import decoder_layers

    model = tiny_model("llama", layers=LAYERS)
    split = split_model(model, 2)
    emu = gradot_emulator(model, split, GradOTConfig(keep=0.5, selection="svd"), None, method="svd")
    r = measure(model, emu.model, emu.manifest, split.middle)
    slot = next(s for s in emu.manifest["slots"] if s["role"] == "middle")
    layer = decoder_layers(model)[slot["source"]]
    # A rank-r factorisation keeping the largest singular values: the Eckart-Young error.
    name, rank = next(iter(slot["ranks"].items()))
    S = torch.linalg.svdvals(layer.get_submodule(name).weight.detach().double())
    expected = float(S[rank:].norm() / S.norm())
    got = next(m for m in r.matrices if m.layer == slot["source"] and m.name == name)
    assert got.kind == "lowrank" and got.own_error == pytest.approx(expected, rel=1e-4)
    # Channel pruning: the kept rows are placed where they came from; the error is that of the pruned rows.
    up = layer.mlp.up_proj.weight.detach().double()
    kept_rows = emu.model.get_submodule("model.layers.2.mlp.up_proj").weight.detach().double()
    assert kept_rows.shape[0] == slot["channels"] < up.shape[0]
    rows = [int((up - row).abs().sum(1).argmin()) for row in kept_rows]
    mask = torch.ones(up.shape[0], dtype=torch.bool)
    mask[rows] = False
    got = next(m for m in r.matrices if m.layer == slot["source"] and m.name == "mlp.up_proj")
    assert got.kind == "pruned" and got.own_error == pytest.approx(float(up[mask].norm() / up.norm()), rel=1e-6)
    assert 0 < r.exact_fraction < 1 and r.mean_own_error < 1


def test_privacy_measure_of_shared_layers():
    from gradot.analysis.privacy import measure

    model = tiny_model("llama", layers=10)
    split = split_model(model, 2)
    emu = shared_emulator(model, split, [([2, 3, 4], 3), ([5], 5), ([6, 7], 6)])
    r = measure(model, emu.model, emu.manifest, split.middle)
    reps = {s["source"] for s in emu.manifest["slots"] if s["role"] == "middle"}
    assert any(v.endswith("(shared)") for v in r.layer_status.values())
    for m in r.matrices:
        if m.layer in reps:
            assert m.own_error == 0
        else:  # a clustered-away layer ships nothing of its own; its representative may be the best guess
            assert m.own_error == 1 and m.best_error <= 1


# --------------------------------------------------------------------------------------------- review findings


def _retype(folder: Path, name: str, key: str, tensor: torch.Tensor) -> None:
    """Replace one tensor and describe it truthfully in the manifest (hash, dtype): only the
    loader's own rules can refuse it."""
    tensors = read_st(folder / name)
    tensors[key] = tensor
    save_file(tensors, folder / name)
    m = read_manifest(folder)
    m["files"][name]["tensors"][key] = {"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}
    m["files"][name]["sha256"] = sha256_file(folder / name)
    write_manifest(folder, m)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / CFG).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / CFG).write_text(json.dumps(config))
    rehash(folder, CFG)


def test_custom_code_in_a_shipped_config_is_refused_never_run(emulator_dir, tmp_path):
    marker = tmp_path / "PWNED"
    (emulator_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    _edit_config(emulator_dir, model_type=None, auto_map={"AutoConfig": "evil.EvilConfig"})
    for loader in (load_emulator, load_emulator_tokenizer):
        with pytest.raises(ArtifactError, match="custom code") as exc:
            loader(emulator_dir)
        assert_clean(exc.value, emulator_dir)
    assert not marker.exists()


def test_attention_kernels_beyond_eager_and_sdpa_are_refused(emulator_dir):
    _edit_config(emulator_dir, attn_implementation="kernels-community/flash-attn")
    with pytest.raises(ArtifactError, match="attn_implementation") as exc:
        load_emulator(emulator_dir)
    assert_clean(exc.value, emulator_dir)


def test_tensor_dtypes_must_be_the_declared_float_dtype(shipped, emulator_dir, adapter_dir):
    model, _ = shipped
    key = "model.layers.2.mlp.down_proj.weight"
    original = read_st(emulator_dir / EMU)[key]
    _retype(emulator_dir, EMU, key, original.double())  # would load, then fail in the first forward
    with pytest.raises(ArtifactError, match=f"tensor {key} is float64, expected float32") as exc:
        load_emulator(emulator_dir)
    assert_clean(exc.value, emulator_dir)
    akey = "model.layers.7.self_attn.q_proj.weight"
    a = read_st(adapter_dir / ADA)[akey]
    _retype(adapter_dir, ADA, akey, a.to(torch.float8_e4m3fn))  # torch.isfinite cannot even read it
    with pytest.raises(ArtifactError, match="is float8_e4m3fn, expected") as exc:
        plug_in(copy.deepcopy(model), adapter_dir)
    assert_clean(exc.value, adapter_dir)
    huge = a.double()
    huge[0, 0] = 1e300  # finite in float64, inf in the model's float32
    _retype(adapter_dir, ADA, akey, huge)
    target = copy.deepcopy(model)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ArtifactError, match=f"{akey} overflows the model's float32") as exc:
        plug_in(target, adapter_dir)
    assert_clean(exc.value, adapter_dir)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing written


def test_absurd_layer_counts_are_refused_without_enumerating_them(shipped, emulator_dir, adapter_dir):
    model, _ = shipped
    for folder in (emulator_dir, adapter_dir):
        m = read_manifest(folder)
        m["base"]["num_layers"], m["adapter"]["k"] = 2 * 10**9 + 1, 10**9
        write_manifest(folder, m)
        with time_limit(10), pytest.raises(ArtifactError, match="base.num_layers") as exc:
            load(model, "adapter" if folder == adapter_dir else "emulator", folder)
        assert_clean(exc.value, folder)


def test_a_pruned_adapter_layer_is_refused(emulator_dir):
    m = read_manifest(emulator_dir)
    m["slots"][0]["channels"] = 3
    write_manifest(emulator_dir, m)
    with pytest.raises(ArtifactError, match=r"'slots\[0\].channels' is 3, expected 64, the MLP width config.json gives the layer \(an adapter layer is never pruned\)") as exc:
        load_emulator(emulator_dir)
    assert_clean(exc.value, emulator_dir)


def test_manifest_may_not_be_a_symbolic_link(emulator_dir, tmp_path):
    real = tmp_path / "elsewhere.json"
    shutil.move(emulator_dir / MAN, real)
    os.symlink(real, emulator_dir / MAN)
    with pytest.raises(ArtifactError, match="symbolic link"):
        load_emulator(emulator_dir)


def test_info_reports_the_named_kinds_error_and_escapes_control_characters(emulator_dir, capsys):
    m = read_manifest(emulator_dir)
    m["method"] = "uniform\x1b[2J\x1b]0;owned\x07"
    write_manifest(emulator_dir, m)
    assert main(["info", str(emulator_dir)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "uniform\\x1b[2J" in out
    m["slots"][0]["role"] = "middle"
    write_manifest(emulator_dir, m)
    assert main(["info", str(emulator_dir)]) == 2
    err = capsys.readouterr().err
    assert "slots[0].role" in err and "gradot-adapter" not in err


def test_layers_that_compute_by_position_are_refused():
    from gradot.registry import UnsupportedModelError, arch_of

    model = tiny_model("gpt2", layers=4)
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UnsupportedModelError, match="scale_attn_by_inverse_layer_idx"):
        arch_of(model)


def test_aliases_must_match_the_architectures_sharing(emulator_dir):
    # Tie a frozen middle weight to a trainable adapter weight: same shapes, hashes updated.
    key, target = "model.layers.2.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    _drop_tensor(emulator_dir, key, EMU)
    m = read_manifest(emulator_dir)
    m["aliases"][key] = target
    write_manifest(emulator_dir, m)
    with pytest.raises(ArtifactError, match="'aliases' do not match the layer sharing") as exc:
        load_emulator(emulator_dir)
    assert_clean(exc.value, emulator_dir)


def test_an_adapter_from_a_bfloat16_compression_plugs_into_the_float32_model(tmp_path):
    model = tiny_model("llama", layers=LAYERS)
    half = copy.deepcopy(model).to(torch.bfloat16)  # the model owner compressed a bf16 load
    emu = uniform_emulator(half, split_model(half, 2), 0.5)
    save_emulator(emu, tmp_path / "emu")
    loaded = load_emulator(tmp_path / "emu")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    save_adapter(loaded, tmp_path / "adapter")
    assert read_manifest(tmp_path / "adapter")["base"]["dtype"] == "bfloat16"
    plug_in(model, tmp_path / "adapter")  # a float32 model: compared after rounding to bfloat16
    with pytest.raises(ArtifactError, match="fingerprint was taken in bfloat16"):  # another model still fails
        plug_in(tiny_model("llama", layers=LAYERS, seed=1), tmp_path / "adapter")


def test_config_swapped_after_its_hash_check_is_refused(emulator_dir, monkeypatch):
    checked = artifacts.files._check_hash

    def check_then_swap(folder, name, entry):
        path = checked(folder, name, entry)
        if name == CFG:  # the sender rewrites the file between the check and the use
            (folder / CFG).write_text(json.dumps({**json.loads((folder / CFG).read_text()), "vocab_size": 7}))
        return path

    for module in (artifacts.files, artifacts.emulator_io, artifacts.tokenizer):  # every caller's name for it
        monkeypatch.setattr(module, "_check_hash", check_then_swap)
    with pytest.raises(ArtifactError, match="config.json: content hash does not match") as exc:
        load_emulator(emulator_dir)
    assert_clean(exc.value, emulator_dir)


# --------------------------------------------------------------------------------------------- hostile counterparts
#
# Holes an outside campaign of hand-made hostile artifacts got through (issue 14): each test below
# failed on the code before the fix.


def _hostile_k3_adapter(model, folder: Path) -> Path:
    """An adapter claiming k = 3 whose fingerprint is right for k = 3: a uniform emulator of the
    8-layer model ships layers 2 and 5 exactly, so the data owner can compute it; its layers 2 and 5
    are rewritten."""
    emu = uniform_emulator(model, split_model(model, 3), 0.5)
    save_adapter(emu, folder)
    tensors = read_st(folder / ADA)
    for key in tensors:
        if key.startswith(("model.layers.2.", "model.layers.5.")):
            tensors[key] = torch.zeros_like(tensors[key])
    save_file(tensors, folder / ADA)
    rehash(folder, ADA)
    return folder


def test_only_the_owners_split_is_ever_plugged(shipped, tmp_path, capsys):
    model, dirs = shipped
    assert [s["source"] for s in read_manifest(dirs["uniform"])["slots"]] == [0, 1, 2, 5, 6, 7]
    adapter = _hostile_k3_adapter(model, tmp_path / "k3")
    target = copy.deepcopy(model)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ArtifactError, match=r"adapter claims k=3 \(layers \[0, 1, 2, 5, 6, 7\]\), the model owner's "
                                            r"split is k=2 \(layers \[0, 1, 6, 7\]\)") as exc:
        plug_in(target, adapter)
    assert_clean(exc.value, adapter)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # layers 2 and 5 untouched
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    # The CLI takes the split from the emulator the owner shipped, or from --adapter-layers (default 2).
    for split_args in (["--emulator", dirs["uniform"]], [], ["--adapter-layers", "2"]):
        code, _, err = run_cli(capsys, "plugin", "--model", model_dir, "--adapter", adapter, "--out", tmp_path / "p",
                               *split_args)
        assert_one_line(code, err, "adapter claims k=3")
    assert not (tmp_path / "p").exists()
    # An owner who did compress with k = 3 says so, and gets exactly that.
    plug_in(target, adapter, k=3)
    assert torch.equal(target.state_dict()["model.layers.2.mlp.up_proj.weight"],
                       torch.zeros_like(before["model.layers.2.mlp.up_proj.weight"]))


def _drop_tensor(folder: Path, key: str, filename: str = ADA) -> None:
    """Remove one tensor from an artifact's file, its manifest entry and hash updated to match."""
    tensors = read_st(folder / filename)
    del tensors[key]
    save_file(tensors, folder / filename)
    m = read_manifest(folder)
    del m["files"][filename]["tensors"][key]
    m["files"][filename]["sha256"] = sha256_file(folder / filename)
    write_manifest(folder, m)


def _adapter_of(model, folder: Path) -> Path:
    save_adapter(uniform_emulator(model, split_model(model, 2), 0.5), folder)
    return folder


def _hostile_adapter(attack: str, model, folder: Path) -> Path:
    """One adapter the campaign got accepted by `eval --emulator --adapter` (or crashed it)."""
    if attack == "k=3":
        return _hostile_k3_adapter(model, folder)
    if attack == "other depth":
        return _adapter_of(tiny_model("llama", layers=10), folder)
    if attack == "other model_type":
        return _adapter_of(tiny_model("opt", layers=LAYERS), folder)
    if attack == "other fingerprint":
        return _adapter_of(tiny_model("llama", layers=LAYERS, seed=7), folder)
    _adapter_of(model, folder)
    if attack == "layer tensor missing":
        _drop_tensor(folder, "model.layers.6.mlp.up_proj.weight")
    elif attack == "norm of shape [1]":
        _retype(folder, ADA, "model.layers.0.input_layernorm.weight", torch.ones(1))
    elif attack == "float64 1e300":
        _retype(folder, ADA, "model.layers.7.self_attn.q_proj.weight", torch.full((32, 32), 1e300, dtype=torch.float64))
    elif attack in ("smuggled embed_tokens", "smuggled middle layer", "smuggled lm_head"):
        key = {"smuggled embed_tokens": "model.embed_tokens.weight", "smuggled lm_head": "lm_head.weight",
               "smuggled middle layer": "model.layers.3.mlp.up_proj.weight"}[attack]
        _add_tensor(folder, ADA, key, torch.zeros(VOCAB if "layers" not in key else 64, 32), list_it=True)
    elif attack == "listed file that does not exist":
        m = read_manifest(folder)
        m["files"]["notes.txt"] = {"sha256": "ab" * 32}
        write_manifest(folder, m)
    elif attack == "listed file modified":
        (folder / "notes.txt").write_text("v2")
        m = read_manifest(folder)
        m["files"]["notes.txt"] = {"sha256": "ab" * 32}
        write_manifest(folder, m)
    else:
        raise ValueError(attack)
    return folder


HOSTILE_ADAPTERS = {
    "k=3": "adapter claims k=3", "other depth": "adapter holds layers", "other model_type": "adapter is for a 'opt' model",
    "other fingerprint": "base-model fingerprint does not match", "layer tensor missing": "missing: ['model.layers.6",
    "norm of shape [1]": "model.layers.0.input_layernorm.weight has shape [1], model expects [32]",
    "float64 1e300": "overflows the model's float32", "smuggled embed_tokens": "unexpected: ['model.embed_tokens.weight']",
    "smuggled lm_head": "unexpected: ['lm_head.weight']",
    "smuggled middle layer": "unexpected: ['model.layers.3.mlp.up_proj.weight']",
    "listed file that does not exist": "notes.txt: missing",
    "listed file modified": "notes.txt: content hash does not match",
}


@pytest.mark.parametrize("attack", sorted(HOSTILE_ADAPTERS))
def test_eval_on_the_emulator_runs_exactly_plug_ins_checks(attack, shipped, tmp_path, capsys):
    model, dirs = shipped
    adapter = _hostile_adapter(attack, model, tmp_path / "adapter")
    message = HOSTILE_ADAPTERS[attack]
    with pytest.raises(ArtifactError) as refused:
        plug_in(copy.deepcopy(model), adapter)
    assert message in str(refused.value) and "\n" not in str(refused.value)
    code, _, err = run_cli(capsys, "eval", "--emulator", dirs["uniform"], "--adapter", adapter, "--tasks", "piqa",
                           "--limit", "2", "--device", "cpu")
    assert_one_line(code, err, message)
    if attack != "k=3":  # the same refusal, word for word (k=3 names whose split it is)
        assert str(refused.value) in err


@pytest.mark.parametrize("attack", ["listed file that does not exist", "listed file modified"])
def test_every_file_an_adapter_lists_must_exist_and_match(attack, shipped, tmp_path, capsys):
    model, _ = shipped
    adapter = _hostile_adapter(attack, model, tmp_path / "adapter")
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    code, _, err = run_cli(capsys, "plugin", "--model", model_dir, "--adapter", adapter, "--out", tmp_path / "p")
    assert_one_line(code, err, HOSTILE_ADAPTERS[attack])
    assert not (tmp_path / "p").exists()


def _pickle_as_safetensors(folder: Path, name: str) -> None:
    (folder / name).write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    rehash(folder, name)


@pytest.mark.parametrize("kind,damage", [
    (kind, damage) for kind in ("uniform", "adapter")
    for damage in ("hash mismatch", "truncated, re-hashed", "pickle as safetensors", "listed shape edited")
] + [("uniform", "tokenizer modified")])
def test_info_verifies_before_describing(kind, damage, shipped, tmp_path, capsys):
    folder = copy_of(shipped[1][kind], tmp_path / kind)
    name = EMU if kind == "uniform" else ADA
    code, out, _ = run_cli(capsys, "info", folder)
    assert code == 0 and out.startswith("verified: "), out
    if damage == "hash mismatch":
        data = bytearray((folder / name).read_bytes())
        data[-1] ^= 1
        (folder / name).write_bytes(bytes(data))
        message = "content hash does not match"
    elif damage == "truncated, re-hashed":
        (folder / name).write_bytes((folder / name).read_bytes()[:50])
        rehash(folder, name)
        message = "not a readable safetensors file"
    elif damage == "pickle as safetensors":
        _pickle_as_safetensors(folder, name)
        message = "not a readable safetensors file"
    elif damage == "listed shape edited":  # the manifest no longer describes the file
        key = sorted(read_manifest(folder)["files"][name]["tensors"])[0]
        m = read_manifest(folder)
        m["files"][name]["tensors"][key]["shape"] = [1, 1]
        write_manifest(folder, m)
        message = f"tensor {key} "
    else:
        (folder / "tokenizer.json").write_text("{}")
        message = "tokenizer.json: content hash does not match"
    code, _, err = run_cli(capsys, "info", folder)
    assert_one_line(code, err, message)


# Every hostile case below must end in one line and exit code 2, within a time and a memory bound.
# They run as real `gradot` commands, in one child process (one import of torch for all), each
# under an alarm; the child reports how much each case raised its peak RSS.
_RUNNER = r"""
import contextlib, io, json, resource, signal, sys
from gradot.cli import main

def expire(signum, frame):
    raise TimeoutError("still running")

signal.signal(signal.SIGALRM, expire)
results = []
for argv, seconds in json.load(open(sys.argv[1])):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = io.StringIO()
    signal.alarm(seconds)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:
        code = f"{type(exc).__name__}: {exc}"
    finally:
        signal.alarm(0)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    results.append([code, err.getvalue(), grew])
json.dump(results, open(sys.argv[2], "w"))
"""

#: Peak-RSS growth a refused case may cause (the campaign measured 1-6 GB before the fixes).
CASE_MEMORY_MB = 300


def run_hostile(tmp_path: Path, cases: dict[str, tuple[list, str]], seconds: int = 60) -> None:
    """Run ``{label: (argv, expected message)}`` as gradot commands; each must exit 2 with one line
    naming the cause, within ``seconds`` and CASE_MEMORY_MB of new peak memory."""
    import subprocess
    import sys

    spec, out = tmp_path / "cases.json", tmp_path / "results.json"
    spec.write_text(json.dumps([[[str(a) for a in argv], seconds] for argv, _ in cases.values()]))
    subprocess.run([sys.executable, "-c", _RUNNER, str(spec), str(out)], check=True,
                   timeout=120 + seconds * len(cases))
    failures = []
    for (label, (_, message)), (code, err, grew) in zip(cases.items(), json.loads(out.read_text())):
        lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]  # not progress bars
        if code != 2 or len(lines) != 1 or message not in lines[0] or "\x1b" in err:
            failures.append(f"{label}: exit {code}, {err!r}")
        elif grew > CASE_MEMORY_MB:
            failures.append(f"{label}: peak memory grew by {grew} MB")
    assert not failures, "\n".join(failures)


def _big_int_manifest(folder: Path) -> None:
    text = (folder / MAN).read_text()
    (folder / MAN).write_text(text.replace('"num_layers": 8', '"num_layers": ' + "9" * 5000, 1))


def _big_int_config(folder: Path) -> None:
    text = (folder / CFG).read_text()
    (folder / CFG).write_text(text.replace('"vocab_size": 128', '"vocab_size": ' + "1" * 5000, 1))
    rehash(folder, CFG)


def _special_file(folder: Path, name: str, what: str) -> None:
    path = folder / name
    path.unlink()
    if what == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif what == "fifo":
        os.mkfifo(path)
    elif what == "directory":
        path.mkdir()
    else:  # a 300 MB manifest (sparse: its size alone must refuse it)
        with open(path, "wb") as f:
            f.truncate(300 << 20)


def _deep_emulator(folder: Path, positions: int, base_layers: int) -> None:
    """An emulator whose middle is one layer repeated ``positions`` times (each slot shares it)."""
    m = read_manifest(folder)
    slots = m["slots"]
    middle = [dict(slots[2], shares=None)] + [dict(slots[2], shares=2) for _ in range(positions - 5)]
    m["slots"] = slots[:2] + middle + slots[-2:]
    m["base"]["num_layers"] = base_layers
    m["size"]["emulator_depth"] = len(m["slots"])
    write_manifest(folder, m)
    _edit_config(folder, num_hidden_layers=len(m["slots"]))


def _huge_listed_tensor(folder: Path, name: str, key: str) -> None:
    """A listed, hash-correct 1 GiB extra tensor (stored sparse: the disk holds almost nothing)."""
    data = (folder / name).read_bytes()
    n, head = header(data)
    body = data[8 + n:]
    head[key] = {"dtype": "F32", "shape": [1 << 18, 1 << 10], "data_offsets": [len(body), len(body) + (1 << 30)]}
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / name, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + body)
        f.truncate(8 + len(raw) + len(body) + (1 << 30))
    m = read_manifest(folder)
    m["files"][name]["tensors"][key] = {"dtype": "float32", "shape": [1 << 18, 1 << 10]}
    m["files"][name]["sha256"] = sha256_file(folder / name)
    write_manifest(folder, m)


def test_big_numbers_special_files_deep_emulators_and_huge_tensors_end_in_one_line(shipped, tmp_path):
    model, dirs = shipped
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    cases = {}

    def emulator(label, damage, message, commands=("info", "eval", "finetune")):
        folder = copy_of(dirs["uniform"], tmp_path / label.replace(" ", "_"))
        damage(folder)
        argv = {"info": ["info", folder],
                "eval": ["eval", "--emulator", folder, "--tasks", "piqa", "--limit", "1", "--device", "cpu"],
                "finetune": ["finetune", "--emulator", folder, "--task", "piqa", "--train-limit", "2",
                             "--max-steps", "1", "--out", tmp_path / f"{label}-out"]}
        for command in commands:
            cases[f"{label} ({command})"] = (argv[command], message)

    def adapter(label, damage, message):
        folder = copy_of(dirs["adapter"], tmp_path / label.replace(" ", "_"))
        damage(folder)
        cases[f"{label} (info)"] = (["info", folder], message)
        cases[f"{label} (plugin)"] = (["plugin", "--model", model_dir, "--adapter", folder, "--out",
                                       tmp_path / "plugged"], message)
        cases[f"{label} (eval)"] = (["eval", "--emulator", dirs["uniform"], "--adapter", folder, "--tasks", "piqa",
                                     "--limit", "1", "--device", "cpu"], message)

    # 5: integers beyond Python's digit limit.
    emulator("5000-digit int in manifest", _big_int_manifest, "manifest.json: not valid JSON")
    emulator("5000-digit int in config", _big_int_config, "config.json: not a readable JSON config",
             commands=("info", "eval"))
    adapter("5000-digit int in adapter", _big_int_manifest, "manifest.json: not valid JSON")
    # 6: the manifest or a listed file as a link to a device, a FIFO, a directory, or oversized.
    for what in ("/dev/zero", "fifo", "directory", "300 MB"):
        message = {"/dev/zero": "is a symbolic link", "300 MB": "314,572,800 bytes, more than the 4,194,304"}.get(what, "not a plain file")
        emulator(f"manifest {what}", lambda f, w=what: _special_file(f, MAN, w), f"manifest.json: {message}",
                 commands=("info", "eval") if what == "/dev/zero" else ("eval",))
        adapter(f"adapter manifest {what}", lambda f, w=what: _special_file(f, MAN, w), f"manifest.json: {message}")
        if what != "300 MB":
            emulator(f"config {what}", lambda f, w=what: _special_file(f, CFG, w), f"config.json: {message}",
                     commands=("eval",))
            adapter(f"tensors {what}", lambda f, w=what: _special_file(f, ADA, w), f"adapter.safetensors: {message}")
    # 7: many positions sharing one layer.
    emulator("10,000 positions", lambda f: _deep_emulator(f, 10_000, 10_000), "'base.num_layers' is 10000")
    emulator("10,000 positions in an 8-layer base", lambda f: _deep_emulator(f, 10_000, 8),
             "expected a list of 5 to 8 positions")
    # 8: a listed, hash-correct 1 GiB tensor is refused before it is read.
    emulator("1 GiB extra tensor", lambda f: _huge_listed_tensor(f, EMU, "model.layers.9.mlp.up_proj.weight"),
             "tensors do not match the emulator architecture", commands=("eval",))
    adapter("1 GiB extra tensor", lambda f: _huge_listed_tensor(f, ADA, "model.layers.3.mlp.up_proj.weight"),
            "unexpected: ['model.layers.3.mlp.up_proj.weight']")
    del cases["1 GiB extra tensor (info)"]  # info reads no adapter model: it checks the header only (covered above)
    run_hostile(tmp_path, cases)


def _edit_tokenizer(folder: Path, edit) -> None:
    data = json.loads((folder / "tokenizer.json").read_text())
    edit(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    rehash(folder, "tokenizer.json")


TOKENIZER_ATTACKS = {
    # ids beyond the model's 128 embeddings: a traceback deep in training, before the fix
    "token id >= vocab size": (lambda t: t["model"]["vocab"].update({"zzz": 5000}), "has token id 5000"),
    # a split regex that backtracks on long words: a Rust panic
    "backtracking split regex": (
        lambda t: t.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(a|aa)+$"}, "behavior": "Isolated",
                                          "invert": False}),
        "fails on long words"),
    # one character expanded to 300k
    "expanding normalizer": (
        lambda t: t.update(normalizer={"type": "Replace", "pattern": {"String": "a"}, "content": "b" * 300_000}),
        "inserts 300,000 characters"),
    # 22 chained replacements of a letter no fixed probe text holds: 2^22 characters of one
    "22 chained replacements": (
        lambda t: t.update(normalizer={"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "q"}, "content": "qq"} for _ in range(22)]}),
        "the normalizer chains 22 rules (at most 16)"),
    "8 chained quadruplings": (
        lambda t: t.update(normalizer={"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"String": "q"}, "content": "qqqq"} for _ in range(8)]}),
        "can make up to 65,536 characters of one (at most 256)"),
    "regex replacements": (  # a regex may match the empty string: an insertion before every character
        lambda t: t.update(normalizer={"type": "Sequence", "normalizers": [
            {"type": "Replace", "pattern": {"Regex": "q?"}, "content": "xyz"} for _ in range(5)]}),
        "can make up to 1,024 characters of one (at most 256)"),
    # a split regex that does not panic but runs for minutes on long words (quadratic backtracking)
    "slow split regex": (
        lambda t: t.update(pre_tokenizer={"type": "Split", "pattern": {"Regex": "\\w*(?=\\d)"},
                                          "behavior": "Isolated", "invert": False}),
        "took over 10 s of CPU time on the probe texts"),
    "200k added tokens": (
        lambda t: t["added_tokens"].extend({"id": 3 + i % 100, "content": f"<t{i}>", "single_word": False,
                                            "lstrip": False, "rstrip": False, "normalized": False, "special": False}
                                           for i in range(200_000)),
        "200,003 added tokens"),
}


def test_hostile_tokenizers_are_refused_in_bounded_time_and_memory(shipped, tmp_path, monkeypatch):
    _, dirs = shipped
    monkeypatch.setenv("GRADOT_CACHE", str(tmp_path / "cache"))  # the probe's verdicts: judged afresh here
    cases = {}
    for label, (edit, message) in TOKENIZER_ATTACKS.items():
        folder = copy_of(dirs["uniform"], tmp_path / label.replace(" ", "_"))
        _edit_tokenizer(folder, edit)
        with pytest.raises(ArtifactError, match=re.escape(message)) as exc:
            with time_limit(60):
                load_emulator_tokenizer(folder)
        assert_clean(exc.value, folder)
        cases[f"{label} (finetune)"] = (["finetune", "--emulator", folder, "--task", "piqa", "--train-limit", "2",
                                         "--max-steps", "1", "--out", tmp_path / f"{label}-out"], message)
    run_hostile(tmp_path, cases)


def test_the_probes_verdict_is_cached_per_tokenizer(shipped, tmp_path, monkeypatch):
    from gradot.artifacts import tokenizer as shipped_tokenizer

    _, dirs = shipped
    monkeypatch.setenv("GRADOT_CACHE", str(tmp_path / "cache"))
    slow = copy_of(dirs["uniform"], tmp_path / "slow")
    _edit_tokenizer(slow, TOKENIZER_ATTACKS["slow split regex"][0])
    honest = copy_of(dirs["uniform"], tmp_path / "honest")
    probes = []
    real = shipped_tokenizer._run_probe
    monkeypatch.setattr(shipped_tokenizer, "_run_probe", lambda *a: probes.append(a) or real(*a))
    for _ in range(2):
        with pytest.raises(ArtifactError, match="took over 10 s of CPU time") as exc:
            load_emulator_tokenizer(slow)
        assert_clean(exc.value, slow)
        load_emulator_tokenizer(honest)("the cat sat on the mat")
    assert len(probes) == 2  # each tokenizer probed once, then judged by its cached verdict
    copy_of(dirs["uniform"], tmp_path / "elsewhere")  # the same files in another folder: the same verdict
    load_emulator_tokenizer(tmp_path / "elsewhere")
    assert len(probes) == 2
    _edit_tokenizer(honest, lambda t: t["model"]["vocab"].update({"zz": 127}))  # another tokenizer: probed
    load_emulator_tokenizer(honest)
    assert len(probes) == 3


def test_every_tokenization_is_capped_in_tokens_per_character():
    from gradot.errors import TokenCapError
    from gradot.finetune import FinetuneDataset
    from gradot.evaluation.scorer import FastHFLM

    class Expanding:  # a tokenizer that makes 100 tokens of every character
        bos_token_id = eos_token_id = 0

        def __call__(self, text, **kwargs):
            return {"input_ids": [5] * (100 * len(text))}

        def encode(self, text, **kwargs):
            return self(text)["input_ids"]

        def decode(self, ids):
            return ""

    for records, message in (([("Question: a", " b")], "record 0: 1,300 tokens of 13 characters, more than the 120"),
                             (["the cat sat"], "record 0: 1,100 tokens of 11 characters, more than the 104")):
        with pytest.raises(TokenCapError, match=message) as exc:
            FinetuneDataset(Expanding(), records)
        assert "\n" not in str(exc.value)
    lm = FastHFLM.__new__(FastHFLM)
    lm.tokenizer, lm.add_bos_token, lm.custom_prefix_token_id = Expanding(), False, 0
    with pytest.raises(TokenCapError, match="an evaluation request: 400 tokens of 4 characters, more than the 48"):
        lm.tok_encode("abcd")
    honest = FinetuneDataset(tiny_tokenizer(), [("the cat", " sat")])
    assert len(honest) == 1


def test_absurd_adapters_are_refused_by_default(shipped, adapter_dir, tmp_path, caplog, capsys):
    model, dirs = shipped
    key = "model.layers.7.mlp.gate_proj.weight"
    _retype(adapter_dir, ADA, key, torch.full((64, 32), 3e38))  # finite, and no fine-tuning goes there
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for plug in (lambda **kw: plug_in(model, adapter_dir, **kw),
                 lambda **kw: artifacts.plug_into_emulator(load_emulator(dirs["uniform"]), adapter_dir, **kw)):
        with pytest.raises(ArtifactError, match=f"{key} moved .* more than the allowed 10x") as exc:
            plug()
        assert_clean(exc.value, adapter_dir)
        with pytest.raises(ArtifactError, match=f"{key} moved .* more than the allowed 5x"):
            plug(max_change=5)
        # With the bound off, the plugged model's logits overflow: refused by the probe, the model untouched.
        with pytest.raises(ArtifactError, match="gives non-finite logits on a 16-token probe") as exc:
            plug(max_change=0)
        assert_clean(exc.value, adapter_dir)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    for extra, message in (([], "more than the allowed 10x"), (["--max-change", "5"], "more than the allowed 5x"),
                           (["--max-change", "0"], "non-finite logits")):
        code, _, err = run_cli(capsys, "plugin", "--model", model_dir, "--adapter", adapter_dir, "--out",
                               tmp_path / "p", *extra)
        assert_one_line(code, err, message)
        assert not (tmp_path / "p").exists()
        code, _, err = run_cli(capsys, "eval", "--emulator", dirs["uniform"], "--adapter", adapter_dir, "--tasks",
                               "piqa", "--limit", "1", "--device", "cpu", *extra)
        assert_one_line(code, err, message)
    # With the bound off, a large but finite move is plugged with a warning.
    _retype(adapter_dir, ADA, key, torch.full((64, 32), 1.0))
    with caplog.at_level("WARNING", logger="gradot.artifacts"):
        plug_in(copy.deepcopy(model), adapter_dir, max_change=0)
    assert f"{key} moved" in caplog.text and "no plausible fine-tuning" in caplog.text
    # An ordinary fine-tuning step stays far below the bound.
    emu = load_emulator(dirs["uniform"])
    with torch.no_grad():
        for p in emu.adapter_parameters():
            p.mul_(1.05)
    save_adapter(emu, tmp_path / "tuned")
    caplog.clear()
    with caplog.at_level("WARNING", logger="gradot.artifacts"):
        plug_in(copy.deepcopy(model), tmp_path / "tuned", max_change=0.1)
        plug_in(copy.deepcopy(model), tmp_path / "tuned")
    assert "moved" not in caplog.text


def test_the_change_bound_is_one_function_the_federation_can_share():
    assert artifacts.DEFAULT_MAX_CHANGE == 10
    assert artifacts.change_refusal("w", 3.7) is None  # the largest honest change measured (tiny test models)
    assert artifacts.change_refusal("w", 3.0, max_change=0) is None and artifacts.change_refusal("w", 3.0, None) is None
    line = artifacts.change_refusal("w", 1.5e40)
    assert "w moved 1.5e+40x its original norm, more than the allowed 10x" in line and "\n" not in line
    assert artifacts.relative_change(torch.full((3,), 2.0), torch.ones(3)) == pytest.approx(1.0)


def test_error_lines_escape_control_characters_from_tensor_names(shipped, adapter_dir, tmp_path, capsys):
    model, _ = shipped
    evil = "model.layers.0.\x1b]0;owned\x07\x1b[2J.weight"
    _add_tensor(adapter_dir, ADA, evil, torch.zeros(2), list_it=False)
    with pytest.raises(ArtifactError) as exc:
        plug_in(copy.deepcopy(model), adapter_dir)
    assert "\x1b" not in str(exc.value) and "\\x1b]0;owned\\x07" in str(exc.value)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    code, _, err = run_cli(capsys, "plugin", "--model", model_dir, "--adapter", adapter_dir, "--out", tmp_path / "p")
    assert_one_line(code, err, "tensors not listed in the manifest")
    assert "\x1b" not in err and "\x07" not in err


def test_a_kill_between_the_renames_of_overwrite_loses_neither_copy(shipped, emulator_dir, monkeypatch):
    """Where rename-exchange is missing, the old copy waits beside ``out`` until the new one is in
    place; a run killed between the two renames leaves no ``out``, and the next claim restores it."""
    model, _ = shipped
    before = snapshot(emulator_dir)
    monkeypatch.setattr(artifacts.files, "_renameat2", lambda src, dst, flags: False)
    real_replace = os.replace

    def killed_after_first(src, dst):
        real_replace(src, dst)
        if Path(dst).name.startswith(f".{emulator_dir.name}.old-"):
            raise KeyboardInterrupt("kill -9 between the two renames")

    monkeypatch.setattr(os, "replace", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        save_emulator(uniform_emulator(model, split_model(model, 2), 0.25), emulator_dir, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not emulator_dir.exists() and any(n.startswith(f".{emulator_dir.name}.old-") for n in leftovers(emulator_dir))
    with artifacts.claim_output(emulator_dir, overwrite=True):  # the next run on that --out
        pass
    assert snapshot(emulator_dir) == before and leftovers(emulator_dir) == []
    load_emulator(emulator_dir)


def test_overwrite_exchanges_atomically_and_cleans_stale_temporaries(shipped, emulator_dir):
    model, _ = shipped
    # Left by killed runs of this and earlier versions: cleaned by the next run on the same --out.
    for name in (".tmp-abc123", ".old-999", ".old4242", ".x1y2z3w4"):
        (emulator_dir.parent / f".{emulator_dir.name}{name}").mkdir()
    (emulator_dir.parent / f".{emulator_dir.name}.unrelated-notes").mkdir()  # not ours: kept
    save_emulator(uniform_emulator(model, split_model(model, 2), 0.25), emulator_dir, overwrite=True)
    assert leftovers(emulator_dir) == [f".{emulator_dir.name}.unrelated-notes"]
    assert load_emulator(emulator_dir).manifest["keep_requested"] == 0.25


def test_a_second_writer_of_the_same_out_is_refused_at_once(tiny_model_dir, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "emu"
    lock = tmp_path / ".emu.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # a first `gradot compress --out emu` is running
        code, _, err = run_cli(capsys, "compress", "--model", tiny_model_dir, "--out", out)
        assert_one_line(code, err, "another gradot process is writing it")
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()
    # Something that is not gradot fills a fresh --out while the command works: refused, kept.
    with pytest.raises(ArtifactError, match="already exists"):
        with artifacts.atomic_directory(out) as tmp:
            (tmp / "new.txt").write_text("ours")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"] and leftovers(out) == []


# --------------------------------------------------------------------------------------------- slot dimensions
#
# Every dimension a slot states is bounded by the widths the config gives its position, by the check
# of the slot's kind, before a tensor is read.


def _sparse_tensors(folder: Path, drop: tuple[str, ...], shapes: dict[str, list[int]]) -> None:
    """Replace the tensors ``drop`` of emulator.safetensors by float32 zeros of ``shapes`` (stored
    sparse), the header, listing and hash all consistent: only the loader's bounds can refuse."""
    data = (folder / EMU).read_bytes()
    n, head = header(data)
    body, kept, new_body = data[8 + n:], {}, []
    offset = 0
    for key, spec in head.items():
        if key == "__metadata__" or key in drop:
            continue
        start, end = spec["data_offsets"]
        kept[key] = dict(spec, data_offsets=[offset, offset + end - start])
        new_body.append(body[start:end])
        offset += end - start
    for key, shape in shapes.items():
        size = 4 * shape[0] * shape[1]  # every shape here is a matrix
        kept[key] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(kept).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / EMU, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(new_body))
        f.truncate(8 + len(raw) + offset)
    m = read_manifest(folder)
    m["files"][EMU]["tensors"] = {k: {"dtype": "float32", "shape": v["shape"]} for k, v in kept.items()}
    m["files"][EMU]["sha256"] = sha256_file(folder / EMU)
    write_manifest(folder, m)


def _huge_harmonizer(folder: Path, rank: int = 1 << 18, channels: int = 1 << 21) -> None:
    """Slot 2 of the uniform emulator (layers 2 and 5 kept) made a ScaleOT harmonizer for layers 2-4
    that claims ``rank`` on every attention linear and ``channels`` MLP channels, its tensors sparse zeros."""
    m = read_manifest(folder)
    listed = m["files"][EMU]["tensors"]
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    shapes = {}
    for name in attn:
        out_f, in_f = listed[f"model.layers.2.self_attn.{name}.weight"]["shape"]
        shapes[f"model.layers.2.self_attn.{name}.down.weight"] = [rank, in_f]
        shapes[f"model.layers.2.self_attn.{name}.up.weight"] = [out_f, rank]
    hidden = listed["model.layers.2.mlp.down_proj.weight"]["shape"][0]
    shapes.update({"model.layers.2.mlp.gate_proj.weight": [channels, hidden],
                   "model.layers.2.mlp.up_proj.weight": [channels, hidden],
                   "model.layers.2.mlp.down_proj.weight": [hidden, channels]})
    m["slots"][2].update(ranks={f"self_attn.{name}": rank for name in attn}, channels=channels, replaces=[2, 3, 4])
    write_manifest(folder, m)
    drop = tuple(f"model.layers.2.{part}.weight" for part in [f"self_attn.{name}" for name in attn]
                 + ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    _sparse_tensors(folder, drop, shapes)


@pytest.mark.parametrize("kind,edit,message", [
    # a kept layer (low-rank or pruned): channels and ranks within the config's widths
    ("svd", lambda s: s[3].update(channels=1 << 21), "'slots[3].channels' is 2097152, expected 1 to 64 MLP channels"),
    ("svd", lambda s: s[3].update(ranks={"self_attn.q_proj": 1 << 18}),
     "'slots[3].ranks.self_attn.q_proj' is 262144, expected a rank of 1 to 32, min(out, in) of that linear"),
    ("svd", lambda s: s[3].update(ranks={"self_attn": 4}), "'slots[3].ranks' is 'self_attn', expected one of the "
                                                            "layer's linears"),
    ("svd", lambda s: s[3].update(channels=16, ranks={"mlp.down_proj": 17}),  # bounded after the pruning
     "'slots[3].ranks.mlp.down_proj' is 17, expected a rank of 1 to 16"),
    # a harmonizer: no wider than the layer, a span that tiles the middle with the other slots
    ("uniform", lambda s: s[2].update(replaces=[2, 3, 4], channels=65),
     "'slots[2].channels' is 65, expected 1 to 64 MLP channels"),
    ("svd", lambda s: s[3].update(replaces=[3, 4]), "'slots[3].replaces' is [3, 4], expected layers 3 to 3"),
    ("uniform", lambda s: s[2].update(replaces=[2, 3, 4, 5]), "'slots[2].replaces' is [2, 3, 4, 5], expected "
                                                               "layers 2 to 4"),
    ("uniform", lambda s: s[2].update(replaces=[2, 3]), "'slots[2].replaces' is [2, 3], expected layers 2 to 4"),
    # own-weight layers in order, each at most once; a shared position repeats its owner's layer
    ("svd", lambda s: s[3].update(source=2), "'slots[3].source' is 2, expected original layers after 2"),
    ("svd", lambda s: s[4].update(source=3), "'slots[4].source' is 3, expected original layers after 3"),
    ("crash", lambda s: s[3].update(source=2), "'slots[3].source' is 2, expected 3, the source of position 2"),
    ("crash", lambda s: s[3].update(channels=5), "'slots[3].channels' is 5, expected 64, the MLP channels of "
                                                  "position 2"),
    ("uniform", lambda s: s[5].update(channels=1 << 21), "'slots[5].channels' is 2097152, expected 64, the MLP "
                                                          "width config.json gives the layer"),
])
def test_slot_dimensions_are_bounded_by_the_configs_widths(shipped, tmp_path, kind, edit, message):
    folder = copy_of(shipped[1][kind], tmp_path / kind)
    m = read_manifest(folder)
    edit(m["slots"])
    write_manifest(folder, m)
    for check in (load_emulator, artifacts.verify):
        with pytest.raises(ArtifactError, match=re.escape(message)) as exc:
            with time_limit(20):
                check(folder)
        assert_clean(exc.value, folder)


def test_a_huge_harmonizer_with_consistent_files_is_refused_before_a_tensor_is_read(shipped, tmp_path):
    """The campaign's case: 2^21 channels and rank 2^18, manifest, header and hash consistent (1 GB of
    sparse zeros): refused on every entry point in seconds, without the memory the tensors need."""
    model, dirs = shipped
    folder = copy_of(dirs["uniform"], tmp_path / "huge")
    _huge_harmonizer(folder)
    message = "'slots[2].channels' is 2097152, expected 1 to 64 MLP channels"
    with pytest.raises(ArtifactError, match=re.escape(message)):
        with time_limit(20):
            load_emulator(folder)
    overlap = copy_of(dirs["uniform"], tmp_path / "overlap")  # the harmonizer's span includes the next slot's layer
    m = read_manifest(overlap)
    m["slots"][2]["replaces"] = [2, 3, 4, 5]
    write_manifest(overlap, m)
    cases = {}
    for label, folder, expected in (("huge", folder, message),
                                    ("overlap", overlap, "'slots[2].replaces' is [2, 3, 4, 5], expected layers 2 to 4")):
        cases[f"{label} (info)"] = (["info", folder], expected)
        cases[f"{label} (eval)"] = (["eval", "--emulator", folder, "--tasks", "piqa", "--limit", "1", "--device", "cpu"],
                                    expected)
        cases[f"{label} (finetune)"] = (["finetune", "--emulator", folder, "--task", "piqa", "--train-limit", "2",
                                         "--max-steps", "1", "--out", tmp_path / f"{label}-out"], expected)
    run_hostile(tmp_path, cases, seconds=30)


def test_info_shortens_long_values_and_json_keeps_them_whole(shipped, emulator_dir, adapter_dir, capsys):
    long = "x" * 3_500_000
    m = read_manifest(emulator_dir)
    m["settings"] = {"note": long, **{f"k{i}": i for i in range(100)}}
    write_manifest(emulator_dir, m)
    a = read_manifest(adapter_dir)
    a["training"] = {"note": long, "steps": list(range(10_000))}
    write_manifest(adapter_dir, a)
    for folder in (emulator_dir, adapter_dir):
        code, out, _ = run_cli(capsys, "info", folder)
        assert code == 0
        assert "\n  note: " + "x" * 232 + "… (3,499,768 more characters)\n" in out  # the line cut at 240
        assert max(len(line) for line in out.splitlines()) < 300
        code, out, _ = run_cli(capsys, "info", folder, "--json")
        assert code == 0 and long in out
    code, out, _ = run_cli(capsys, "info", emulator_dir)
    assert "… (61 more entries)" in out and "k38: 38" in out and "k39" not in out
