"""Where models come from: a Hub name through the Hugging Face cache (offline, from a cache laid out
as a download leaves it), the embedded default's conversion cache keyed by content, and the GGUF
conversion bar kept out of logs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_model, tiny_tokenizer  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(home: Path, repo: str, folder: Path, revision: str = REVISION) -> None:
    """``folder``'s files as the Hugging Face cache holds a downloaded model: blobs linked from
    ``snapshots/<revision>/``, and ``refs/main`` naming the revision."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(folder.iterdir())):
        blob = root / "blobs" / f"blob{i}"
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(revision)


def _offline_env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "GRADOT_"))}
    return {**env, "PYTHONPATH": str(SRC), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
            "GRADOT_CACHE": str(tmp_path / "gradot-cache"), "OMP_NUM_THREADS": "1"}


LOAD = """
import json, sys
from gradot.cli import main
from gradot.modeling import load_model
attempts, compress_argv = json.loads(sys.argv[1]), json.loads(sys.argv[2])
for name, revision in attempts:
    try:
        model, tok = load_model(name, revision=revision)
        print(json.dumps({"type": model.config.model_type,
                          "sum": float(sum(p.detach().double().sum() for p in model.parameters()))}))
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
print(json.dumps({"compress": main(compress_argv)}))
"""

ATTEMPTS = [("tiny-org/tiny-llama", None), ("tiny-org/tiny-llama", REVISION), ("tiny-org/tiny-llama", "main"),
            ("tiny-org/absent", None), ("tiny-org/tiny-llama", "f" * 40), ("org/bert", None), ("org/custom", None)]


@pytest.fixture(scope="module")
def offline_hub(tmp_path_factory):
    """A Hugging Face cache holding a tiny Llama, a BERT config and a model that needs its own code;
    one fresh process (the Hub's settings are read at import) under HF_HUB_OFFLINE=1 loads each of
    ``ATTEMPTS`` and compresses the Llama through the command line: ``(results, home)``."""
    from transformers import BertConfig

    home = tmp_path_factory.mktemp("offline-hub")
    saved = home / "saved"
    tiny_model("llama").save_pretrained(saved)
    tiny_tokenizer().save_pretrained(saved)
    _hub_cache(home / "hf", "tiny-org/tiny-llama", saved)
    bert = home / "bert"  # a config alone: the weights would be needed only after the registry check
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(bert)
    _hub_cache(home / "hf", "org/bert", bert)
    custom = home / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"model_type": "my_own_lm", "auto_map": {
        "AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyModel"}}))
    (custom / "configuration_my.py").write_text("raise SystemExit('remote code ran')\n")
    _hub_cache(home / "hf", "org/custom", custom)
    calib = home / "calib.txt"
    calib.write_text("the cat sat on the mat and it was a good day . " * 100)
    compress = ["compress", "--model", "tiny-org/tiny-llama", "--revision", REVISION, "--method", "uniform",
                "--keep", "0.5", "--out", str(home / "emu"), "--calib", str(calib), "--calib-sequences", "2",
                "--calib-len", "16"]
    done = subprocess.run([sys.executable, "-c", LOAD, json.dumps(ATTEMPTS), json.dumps(compress)],
                          env=_offline_env(home), cwd=home, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]  # SystemExit from the model's own code would end it
    results = [json.loads(line) for line in done.stdout.strip().splitlines() if line.startswith("{")]
    return results, home


def test_hub_name_loads_from_the_cache_offline(offline_hub):
    """``ORG/NAME`` (and ``--revision``) through from_pretrained and the Hugging Face cache under
    HF_HUB_OFFLINE=1: the same weights as the folder; an uncached name or revision is one error."""
    results, _ = offline_hub
    want = float(sum(p.detach().double().sum() for p in tiny_model("llama").parameters()))
    for got in results[:3]:
        assert got.get("type") == "llama" and got["sum"] == pytest.approx(want, rel=1e-9), got
    for got, hint in zip(results[3:5], ("tiny-org/absent", "f" * 40)):
        assert got.get("error") == "ModelLoadError" and "HF_HUB_OFFLINE" in got["message"] and hint in got["message"], got


def test_hub_model_through_the_command_line(offline_hub):
    """The CLI takes the Hub name (and --revision) like any --model: compress an emulator from it."""
    results, home = offline_hub
    assert results[-1] == {"compress": 0}
    assert json.loads((home / "emu" / "manifest.json").read_text())["slots"]


def test_hub_model_architecture_checked_and_remote_code_refused(offline_hub):
    """The registry check runs on the config, before any weight is read; a model that needs its own
    code is refused (trust_remote_code stays off) without running it."""
    results, _ = offline_hub
    bert, custom = results[5:7]
    assert bert["error"] == "UnsupportedModelError" and "unsupported architecture 'bert'" in bert["message"]
    assert custom["error"] == "ModelLoadError" and "org/custom" in custom["message"]


def test_revision_needs_a_hub_name(tiny_model_dir):
    from gradot.errors import ModelLoadError
    from gradot.modeling import is_hub_name, load_model

    assert is_hub_name("Qwen/Qwen2.5-0.5B") and not is_hub_name(str(tiny_model_dir)) and not is_hub_name("default")
    assert not is_hub_name("./a/b") and not is_hub_name("a/b/c") and not is_hub_name("dir/model.gguf")
    with pytest.raises(ModelLoadError, match="--revision applies to a Hub name"):
        load_model(str(tiny_model_dir), revision="main")


def test_default_model_cache_keyed_by_content(tmp_path):
    """The same GGUF bytes give one cache entry whatever the file's path or time; other bytes (or
    another converter version) another."""
    from gradot.modeling import default_cache_key

    a, b, c = tmp_path / "a.gguf", tmp_path / "sub" / "a.gguf", tmp_path / "c.gguf"
    b.parent.mkdir()
    a.write_bytes(b"GGUF" + bytes(range(256)) * 100)
    shutil.copy(a, b)
    os.utime(b, (1, 1))
    c.write_bytes(b"GGUF" + bytes(range(255)) * 100)
    assert default_cache_key(a, "5.0") == default_cache_key(b, "5.0")
    assert default_cache_key(a, "5.0") != default_cache_key(c, "5.0")
    assert default_cache_key(a, "5.0") != default_cache_key(a, "5.1")


def test_gguf_conversion_bar_quiet_unless_asked():
    """transformers' GGUF bar is disabled unless shown (-v or a terminal), and restored after."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from gradot.modeling import _gguf_progress_bar

    original = gguf_utils.tqdm
    with _gguf_progress_bar(False):
        assert gguf_utils.tqdm(range(3)).disable
    assert gguf_utils.tqdm is original
    with _gguf_progress_bar(True):
        assert gguf_utils.tqdm is original
