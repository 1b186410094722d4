"""The methods package: the registry, options generated from config dataclasses, and emulators
unchanged by the move into ``gradot.methods`` (digests recorded from the code before it).

Regenerate the digests (only when a change of results is intended, and say so in the commit):
    PYTHONPATH=src python tests/test_methods.py --record tests/data/method_digests.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import VOCAB, tiny_model, tiny_tokenizer  # noqa: E402

DIGESTS = Path(__file__).parent / "data" / "method_digests.json"
ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "opt", "gpt2"]
CASES = {  # name -> command-line options after --method
    "uniform": ["uniform"], "crash": ["crash"], "svd": ["svd"], "wanda": ["wanda"],
    "gradot-uniform": ["gradot", "--allocation", "uniform"],
    "gradot-global": ["gradot", "--allocation", "global"],
    "gradot-global-layers": ["gradot", "--allocation", "global-layers"],
}
EXTRA = {  # llama only: the first-order term, the statistics in chunks, the automatic λ
    "gradot-global-lambda": ["gradot", "--allocation", "global", "--lambda-attn", "0.1", "--lambda-mlp", "0.2"],
    "gradot-global-layers-lpp1": ["gradot", "--allocation", "global-layers", "--layers-per-pass", "1"],
    "gradot-auto-lambda": ["gradot", "--allocation", "global", "--auto-lambda", "0.9"],
}
# Per-logit tolerance: float32 rounding, not a change of the emulator. Compression runs in float32
# (KFAC factors, their eigendecompositions, SVDs) and another summation order (thread count,
# LAPACK/BLAS kernels, the transformers version's forward) moves the weights' last bits, which the
# decompositions amplify: seen 1.3e-6 on llama gradot-uniform between transformers releases (the
# float32 forward alone: 3e-7); 5e-6 is ~170 float32 ulps at these logits' size (|logit| < 0.5).
# The smallest real change recorded here (λ 0.1/0.2 on gradot-global) moves a logit by 5e-3, and
# any change of ranks or kept channels already changes the manifest's hash.
LOGIT_TOL = 5e-6
CALIB_TEXT = "the cat sat on the mat and it was a good day for a walk in the park . " * 200


def _cases():
    for arch in ARCHITECTURES:
        for name in CASES:
            yield arch, name
    for name in EXTRA:
        yield "llama", name


def digest(root: Path, arch: str, case: str) -> dict:
    """Compress a tiny ``arch`` model with ``case`` through the command line; the manifest (less its
    timing and file hashes: slots, size, settings, calibration) as a hash, the layers its slots
    come from, and the loaded emulator's logits on a fixed input (sums and a sample)."""
    from gradot.artifacts import load_emulator
    from gradot.cli import main

    calib = root / "calib.txt"
    if not calib.exists():
        calib.write_text(CALIB_TEXT)
    folder = root / arch  # the folder's name enters the manifest
    if not folder.exists():
        tiny_model(arch).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
    out = root / "emu" / f"{arch}-{case}"
    argv = ["compress", "--model", str(folder), "--keep", "0.5", "--out", str(out), "--overwrite", "--calib",
            str(calib), "--calib-sequences", "4", "--calib-len", "16", "--batch-size", "2", "--method",
            *{**CASES, **EXTRA}[case]]
    assert main(argv) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"].pop("compress_seconds")
    manifest.pop("files")
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = load_emulator(out).model(input_ids=ids).logits.double()
    # auto-λ's measured cosines leave the hash (their last bits follow the thread count's summation
    # order) and are compared with a tolerance instead.
    cosines = [point.pop("cosine") for point in manifest["settings"].get("auto_lambda", {}).get("curve", [])]
    return {"manifest_sha256": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
            "auto_lambda_cosines": cosines,
            "slot_sources": [s["source"] for s in manifest["slots"]], "logits_sum": float(logits.sum()), "logits_abs_sum": float(logits.abs().sum()),
            "logits_sample": logits.flatten()[:: max(1, logits.numel() // 8)].tolist()}


@pytest.fixture(scope="module")
def recorded():
    return json.loads(DIGESTS.read_text())


@pytest.mark.parametrize("arch,case", list(_cases()), ids=lambda x: x)
def test_emulator_unchanged_by_the_move(tmp_path_factory, recorded, arch, case):
    root = tmp_path_factory.getbasetemp() / "method-digests"
    root.mkdir(exist_ok=True)
    got, want = digest(root, arch, case), recorded[f"{arch}-{case}"]
    assert got["slot_sources"] == want["slot_sources"]
    assert got["manifest_sha256"] == want["manifest_sha256"]
    assert got["auto_lambda_cosines"] == pytest.approx(want["auto_lambda_cosines"], abs=1e-5)
    assert got["logits_sample"] == pytest.approx(want["logits_sample"], abs=LOGIT_TOL)
    # Sums over every logit, held to the same tolerance per logit as the sample.
    scale = LOGIT_TOL * 2 * 16 * VOCAB
    assert got["logits_sum"] == pytest.approx(want["logits_sum"], abs=scale)
    assert got["logits_abs_sum"] == pytest.approx(want["logits_abs_sum"], abs=scale)


if __name__ == "__main__" and sys.argv[1:2] == ["--record"]:
    import tempfile

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        digests = {f"{a}-{c}": digest(Path(tmp), a, c) for a, c in _cases()}
    lines = ",\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in digests.items())
    Path(sys.argv[2]).write_text("{\n" + lines + "\n}\n")  # one case a line
    print(f"{len(digests)} digests written to {sys.argv[2]}")


# ---------------------------------------------------------------------------------------------
# The registry: a method is one class and one registration


def _toy_method():
    """A toy method, every STRIDE-th middle layer kept: defined and registered as a user would."""
    from gradot.emulator import assemble
    from gradot.methods import MethodConfig, option
    from gradot.offload import plain_copy
    from gradot.registry import decoder_layers

    @dataclass(frozen=True)
    class StrideConfig(MethodConfig):
        stride: int = option(2, "keep every STRIDE-th middle layer", minimum=1, metavar="STRIDE")

    class Stride:
        name = "stride"
        help = "toy: every STRIDE-th middle layer"
        config = StrideConfig
        needs_calibration = False

        def build(self, model, split, config, calibration=None):
            chosen = split.middle[::config.stride]
            layers = [plain_copy(decoder_layers(model)[i]) for i in chosen]
            return assemble(model, split, layers, chosen, [None] * len(chosen), method=self.name, keep=config.keep,
                            settings={"stride": config.stride})

    return Stride()


@pytest.fixture
def toy_registered():
    from gradot.methods import REGISTRY, register

    method = register(_toy_method())
    yield method
    del REGISTRY[method.name]


def test_toy_method_through_the_registry_alone(toy_registered, tiny_model_dir, tmp_path, capsys):
    from gradot.cli.app import build_parser, main

    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["compress"].format_help().split())
    assert "stride: toy: every STRIDE-th middle layer" in help_text and "--stride STRIDE" in help_text
    out = tmp_path / "emu"
    assert main(["compress", "--model", str(tiny_model_dir), "--method", "stride", "--stride", "3",
                 "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["method"] == "stride" and manifest["settings"]["stride"] == 3
    # six layers, k = 2: middle 2, 3; every third keeps layer 2
    assert [s["source"] for s in manifest["slots"]] == [0, 1, 2, 4, 5]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--model", str(tiny_model_dir), "--method", "stride", "--stride", "0", "--out",
              str(tmp_path / "bad")])
    assert exc.value.code == 2 and "expected a positive integer, got 0" in capsys.readouterr().err


def test_pipeline_reads_a_registered_method_options(toy_registered):
    from gradot.methods import compress_option_names, runtime_options

    assert "stride" in compress_option_names() and "stride" not in runtime_options()


def config_fields(cls):
    from gradot.methods import config_options

    return config_options(cls)


def test_cached_cell_settings_keys_unchanged():
    """The pipeline's cached cells are keyed on these settings: the built-in methods offer exactly
    the options they offered before the registry (cells computed then stay valid)."""
    from gradot.methods import compress_option_names, runtime_options

    from gradot.methods import distill, scaleot

    trained = {f.name for cls in (distill.DistillConfig, scaleot.ScaleOTConfig) for f in config_fields(cls)}
    later = trained | {"layer_drop", "kfac_tokens", "kfac_bf16", "damping"}  # added since; at their defaults older cells stay valid
    assert set(compress_option_names()) - later == {
        "adapter_layers", "calib", "calib_sequences", "calib_len", "batch_size", "lambda_attn", "lambda_mlp",
        "allocation", "top_frac", "gradient_checkpointing", "auto_lambda", "layers_per_pass"}
    assert set(runtime_options()) - later == {"batch_size", "gradient_checkpointing", "layers_per_pass"}


def test_a_folder_recorded_before_new_options_accepts_them_at_their_defaults(tmp_path):
    """The trained methods' options came later: a folder recorded without them is still claimed when
    they are at their defaults, and refused when one is not."""
    from gradot.errors import PipelineSettingsError
    from gradot.methods import compress_option_names, method_options
    from gradot.pipeline import PipelineConfig, cell_settings, claim_output_folder

    options = method_options()
    args = {k: (options[k][0].default if k in options else None) for k in compress_option_names()}
    args.update(adapter_layers=2, calib_sequences=32, calib_len=256, batch_size=8)
    cfg = PipelineConfig(model="m", methods=["uniform"], tasks=["arc_easy"], keep=0.7, out=str(tmp_path),
                         compress_args=args)
    settings = cell_settings(cfg)
    old = json.loads(json.dumps(settings))
    for key in ("distill_steps", "kd_weight", "init", "attn_keep"):
        del old["compress_args"][key]
    (tmp_path / "settings.json").write_text(json.dumps(old))
    claim_output_folder(tmp_path, settings)
    changed = {**settings, "compress_args": {**settings["compress_args"], "distill_steps": 7}}
    with pytest.raises(PipelineSettingsError, match="distill_steps"):
        claim_output_folder(tmp_path, changed)


def test_method_settings_errors_are_usage_errors(tiny_model_dir, tmp_path, capsys):
    from gradot.cli import main

    code = main(["compress", "--model", str(tiny_model_dir), "--method", "gradot", "--auto-lambda", "0.9",
                 "--layers-per-pass", "1", "--out", str(tmp_path / "emu")])
    assert code == 2 and "drop --layers-per-pass" in capsys.readouterr().err


def test_cheaper_kfac_products_are_recorded_and_checked(tiny_model_dir, tmp_path, capsys):
    """``--kfac-tokens``/``--kfac-bf16`` change the factors, so the manifest says so (the exact
    default records nothing); a share outside (0, 1] is a usage error."""
    from gradot.artifacts import load_emulator
    from gradot.cli import main

    base = ["compress", "--model", str(tiny_model_dir), "--method", "gradot", "--keep", "0.5", "--calib-sequences",
            "4", "--calib-len", "16"]
    assert main(base + ["--kfac-tokens", "0.5", "--kfac-bf16", "--out", str(tmp_path / "cheap")]) == 0
    assert main(base + ["--out", str(tmp_path / "exact")]) == 0
    cheap, exact = (load_emulator(tmp_path / n).manifest["settings"] for n in ("cheap", "exact"))
    assert cheap["kfac_products"] == {"token_fraction": 0.5, "dtype": "bfloat16"}
    assert "kfac_products" not in exact
    assert main(base + ["--kfac-tokens", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "--kfac-tokens must be in (0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The library's import graph


def _imports(path: Path, package: Path) -> set[str]:
    """Modules of the package ``path`` imports (anywhere in it, functions included), as dotted names."""
    import ast

    here = path.relative_to(package.parent).with_suffix("").parts
    here = here[:-1] if here[-1] == "__init__" else here
    base = list(here if path.name == "__init__.py" else here[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[: len(base) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                parts = (node.module or "").split(".")
            if parts[0] == "gradot":
                found.add(".".join(parts))
                found.update(".".join(parts + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] in ("gradot", "argparse"))
            if any(a.name == "argparse" for a in node.names):
                found.add("argparse")
    return found


def _graph() -> dict[str, set[str]]:
    package = Path(__file__).resolve().parents[1] / "src" / "gradot"
    modules = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
    return {name: {m for m in _imports(path, package) if m in modules or m == "argparse"} - {name}
            for name, path in modules.items()}


def test_library_never_imports_the_command_line():
    graph = _graph()
    front = {name for name in graph if name == "gradot.cli" or name.startswith("gradot.cli.")}
    for name, deps in graph.items():
        if name in front:
            continue
        assert not deps & (front | {"argparse"}), f"{name} imports {sorted(deps & (front | {'argparse'}))}"


def test_no_import_cycle():
    graph = _graph()
    # ``from . import __version__`` (a module reading its package's face) is not an edge back.
    edges = {n: {d for d in deps if d != "argparse" and not n.startswith(d + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in edges.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])


# ---------------------------------------------------------------------------------------------
# An architecture is one registry entry (CONTRIBUTING.md, "Adding an architecture")


def test_adding_an_architecture(monkeypatch, tmp_path):
    from transformers import GemmaConfig

    from gradot.artifacts import load_emulator, save_emulator
    from gradot.methods import compress
    from gradot.modeling import random_model
    from gradot.registry import REGISTRY, ArchSpec, UnsupportedModelError, arch_of

    config = GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    model = random_model(config, seed=0)
    with pytest.raises(UnsupportedModelError, match="unsupported architecture 'gemma'"):
        arch_of(model)
    monkeypatch.setitem(REGISTRY, "gemma", ArchSpec(
        layers="model.layers",
        attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        attn_out=("self_attn.o_proj",),
        mlp_in=("mlp.gate_proj", "mlp.up_proj"),
        mlp_out="mlp.down_proj",
    ))
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    options = {"adapter_layers": 2, "calib": str(calib), "calib_sequences": 4, "calib_len": 16, "batch_size": 2}
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    for method in ("uniform", "crash", "svd", "wanda", "gradot"):
        emulator = compress(model, tiny_tokenizer(), method, 0.5, options)
        assert 0.4 < emulator.manifest["size"]["keep_achieved"] <= 0.5 + 1e-9
        save_emulator(emulator, tmp_path / method)
        with torch.no_grad():
            assert torch.allclose(load_emulator(tmp_path / method).model(input_ids=ids).logits,
                                  emulator.model(input_ids=ids).logits, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Architectures that break the llama layout: fused q/k/v (gpt_neox, phi3), fused gate/up (phi3),
# alternating sliding/global attention (gemma2, gemma3_text). Every method, saved and loaded.

NEW_ARCHITECTURES = ["gpt_neox", "phi3", "gemma2", "gemma3_text"]


@pytest.mark.parametrize("arch", NEW_ARCHITECTURES)
def test_every_method_on_architectures_with_fused_or_patterned_layers(arch, tmp_path):
    from gradot.artifacts import load_emulator, save_emulator
    from gradot.methods import compress
    from gradot.registry import decoder_layers

    model = tiny_model(arch)
    calib = tmp_path / "calib.txt"
    calib.write_text(CALIB_TEXT)
    options = {"adapter_layers": 2, "calib": str(calib), "calib_sequences": 4, "calib_len": 16, "batch_size": 2}
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    types = getattr(model.config, "layer_types", None)
    for name, extra in [("uniform", {}), ("crash", {}), ("svd", {}), ("wanda", {}),
                        ("gradot", {"allocation": "uniform"}), ("gradot", {"allocation": "global"}),
                        ("gradot", {"allocation": "global-layers"})]:
        emulator = compress(model, tiny_tokenizer(), name, 0.5, {**options, **extra})
        kept = emulator.manifest["size"]["keep_achieved"]
        assert 0.3 < kept <= 0.5 + 1e-9, (name, extra, kept)
        if types:  # every slot keeps the attention kind of the layer it comes from
            sources = [s["source"] for s in emulator.manifest["slots"]]
            assert emulator.model.config.layer_types == [types[s] for s in sources]
        folder = tmp_path / f"{name}-{extra.get('allocation', '')}"
        save_emulator(emulator, folder)
        loaded = load_emulator(folder)
        assert len(decoder_layers(loaded.model)) == len(emulator.manifest["slots"])
        with torch.no_grad():
            torch.testing.assert_close(loaded.model(input_ids=ids).logits, emulator.model(input_ids=ids).logits,
                                       atol=1e-5, rtol=1e-5)


def test_fused_gate_up_channels_are_pruned_together():
    """phi3's gate_up_proj stacks gate rows then up rows: channel c keeps rows c and I + c."""
    from gradot.registry import arch_of, decoder_layers, get_module
    from gradot.surgery import prune_mlp_channels

    model = tiny_model("phi3")
    arch = arch_of(model)
    layer = decoder_layers(model)[2]
    before = get_module(layer, "mlp.gate_up_proj").weight.detach().clone()
    kept = torch.tensor([1, 5, 7])
    prune_mlp_channels(layer, arch, kept)
    after = get_module(layer, "mlp.gate_up_proj").weight
    assert torch.equal(after, before[torch.cat([kept, kept + 64])])
    assert get_module(layer, "mlp.down_proj").weight.shape == (32, 3)


def test_multimodal_gemma3_is_refused_with_a_reason():
    from transformers import Gemma3Config

    from gradot.registry import UnsupportedModelError, arch_of

    with pytest.raises(UnsupportedModelError, match="compress its text model"):
        arch_of(Gemma3Config())
