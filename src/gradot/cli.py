"""``gradot`` command line: a thin layer over the library (one sub-command per role's step)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import __version__


class UsageError(ValueError):
    """Bad command-line input (reported as one line, exit code 2)."""


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default (unless it is None or a flag's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.option_strings and action.default not in (None, False, argparse.SUPPRESS)
                and "%(default)" not in text and action.nargs != 0):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """A usage error is one line naming the cause and where help is, not argparse's usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _keep(value: str) -> float:
    try:
        keep = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep must be a number in (0, 1], got {value!r}") from None
    if not 0 < keep <= 1:
        raise argparse.ArgumentTypeError(f"--keep must be in (0, 1], got {keep}")
    return keep


def int_at_least(low: int, what: str):
    """An argparse type: an integer >= ``low``; ``what`` names it in the error ("a positive integer")."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {n}")
        return n

    return parse


_positive_int = int_at_least(1, "a positive integer")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M), a local Hugging Face model folder, or a .gguf file")


DTYPES = ("float32", "bfloat16", "float16")


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (a CUDA GPU when one is visible, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", choices=DTYPES,
                   help="dtype the model's weights are loaded in (bfloat16 halves their memory on a GPU; "
                        "curvature statistics and scores are always accumulated in float32)")


def resolve_device(value: str) -> str:
    """The torch device for ``--device``; a GPU that is not there is a usage error, not a crash later."""
    import torch

    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if value == "cpu":
        return value
    if value == "cuda" or value.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {value}: no CUDA GPU is visible (use --device cpu)")
        index = value.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise UsageError(f"--device {value}: there are {torch.cuda.device_count()} CUDA device(s)")
        return value
    raise UsageError(f"--device must be auto, cpu, cuda or cuda:N, got {value!r}")


def _add_placement(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models larger than the device (accelerate device maps)")
    g.add_argument("--device-map", default=None,
                   help="auto, balanced, sequential, or a JSON file mapping module names to a GPU index, "
                        "'cpu' or 'disk': layers that do not fit are offloaded and loaded around each use "
                        "(overrides --device)")
    g.add_argument("--max-memory", default=None, help="with --device-map: per-device limits, e.g. '0=20GiB,cpu=60GiB'")
    g.add_argument("--offload-dir", default=None, help="with --device-map: folder for layers offloaded to disk")


def resolve_placement(args) -> dict:
    """``load_model`` keywords for ``--device-map``/``--max-memory``/``--offload-dir`` (empty: none)."""
    if args.device_map is None:
        if args.max_memory or args.offload_dir:
            raise UsageError("--max-memory and --offload-dir need --device-map")
        return {}
    value = args.device_map
    if value in ("auto", "balanced", "balanced_low_0", "sequential"):
        device_map = value
    else:
        try:
            with open(value, encoding="utf-8") as fh:
                device_map = json.load(fh)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--device-map: expected auto/balanced/sequential or a JSON file: {exc}") from None
        if not isinstance(device_map, dict) or not all(
                isinstance(k, str) and (isinstance(v, int) or v in ("cpu", "disk") or str(v).startswith("cuda"))
                for k, v in device_map.items()):
            raise UsageError("--device-map file must map module names to a GPU index, 'cpu' or 'disk'")
    max_memory = None
    if args.max_memory:
        max_memory = {}
        for item in args.max_memory.split(","):
            key, sep, size = item.partition("=")
            if not sep or not size.strip():
                raise UsageError(f"--max-memory: expected DEVICE=SIZE items, got {item!r}")
            key = key.strip()
            max_memory[int(key) if key.isdigit() else key] = size.strip()
    return {"device_map": device_map, "max_memory": max_memory, "offload_dir": args.offload_dir}


def check_adapter_folder(path: str) -> None:
    """``--adapter`` must be a folder: said before a model loads (its contents are checked after)."""
    if not Path(path).is_dir():
        raise UsageError(f"--adapter {path}: not a directory")


def resolve_dtype(name: str):
    import torch

    return getattr(torch, name)


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=None,
                   help="calibration text (.txt/.raw or JSONL with 'text'); default: WikiText-2 valid from the shared data")
    p.add_argument("--calib-sequences", type=_positive_int, default=32, help="number of calibration sequences")
    p.add_argument("--calib-len", type=_positive_int, default=256, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="calibration batch size")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gradot", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gradot {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details, and third-party warnings and progress bars that are hidden "
                             "by default (give it before the command: gradot -v compress ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    from .methods import DEFAULT_KEEP

    p = sub.add_parser("compress", help="model owner: build an emulator of the model's middle block")
    _add_model(p)
    p.add_argument("--method", default="uniform", choices=available_methods(),
                   help="uniform: OT† layer drop; crash: CKA clustering + layer sharing; gradot: KFAC "
                        "gradient-preserving rank decomposition + channel pruning; svd: plain SVD + weight-norm "
                        "channel pruning; wanda: plain SVD + activation-aware channel pruning")
    p.add_argument("--keep", type=_keep, default=DEFAULT_KEEP,
                   help="fraction of middle-block parameters to keep, in (0, 1] (default chosen on the transfer frontier: docs/transfer.md)")
    p.add_argument("--adapter-layers", type=_positive_int, default=2, help="k: bottom k and top k layers form the adapter")
    p.add_argument("--out", required=True, help="output directory of the emulator")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    _add_device(p)
    _add_placement(p)
    _add_calibration(p)
    _add_method_options(p)

    p = sub.add_parser("plugin", help="model owner: plug a fine-tuned adapter into the original model")
    _add_model(p)
    p.add_argument("--adapter", required=True, help="adapter directory returned by the data owner")
    p.add_argument("--out", required=True, help="output directory for the plug-in model (Hugging Face format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_split_arguments(p)

    p = sub.add_parser("info", help="describe an emulator or adapter directory")
    p.add_argument("path", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the raw manifest")

    _add_extra_commands(sub)
    return parser


def _positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def add_split_arguments(p: argparse.ArgumentParser, emulator: bool = True) -> None:
    """The model owner's own record of its split, for plugging an adapter into the original model
    (``emulator``: also offer --emulator, where that option is not taken)."""
    g = p.add_mutually_exclusive_group()
    if emulator:
        g.add_argument("--emulator", default=None,
                       help="the emulator you shipped for this adapter: its recorded split k decides which layers "
                            "are replaced (never the split the adapter claims)")
    g.add_argument("--adapter-layers", type=_positive_int, default=None,
                   help="the split k you compressed with (default 2, as in compress); an adapter claiming "
                        "another is refused")
    p.add_argument("--max-change", type=_positive_float, default=None,
                   help="refuse an adapter with a tensor moved more than this many times its original norm "
                        "(default: warn above 1)")


def owner_split(args) -> int:
    """k for plugging into the original model: the shipped emulator's recorded split, else
    --adapter-layers, else compress's default."""
    from .artifacts import emulator_split

    if getattr(args, "emulator", None):
        return emulator_split(args.emulator)
    return args.adapter_layers or 2


def available_methods() -> list[str]:
    from .methods import METHODS

    return sorted(METHODS)


def _add_method_options(p: argparse.ArgumentParser) -> None:
    from .methods import add_method_arguments

    add_method_arguments(p)


def _add_extra_commands(sub) -> None:
    try:
        from .cli_data import add_commands
    except ImportError:  # the data owner's commands are optional at this stage
        return
    add_commands(sub)


# ---------------------------------------------------------------------------------------------


def cmd_compress(args) -> int:
    from .artifacts import claim_output, refuse_existing, save_emulator
    from .methods import check_calibration, compress
    from .modeling import load_model
    from .progress import stage

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    placement = resolve_placement(args)
    # Cheap checks first: none of these should wait for the model to load.
    refuse_existing(args.out, args.overwrite)
    check_calibration(args)
    if placement:
        device = f"device map {args.device_map}"
    with claim_output(args.out, args.overwrite):  # one writer per --out, refused before compressing
        t0 = time.perf_counter()
        with stage(f"loading model {args.model}"):
            model, tok = load_model(args.model, dtype=dtype, device="cpu" if placement else device, **placement)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        emulator = compress(model, tok, args)
        t_compress = time.perf_counter() - t0
        emulator.manifest["settings"]["compress_seconds"] = round(t_compress, 2)
        with stage(f"writing {args.out}"):
            save_emulator(emulator, args.out, overwrite=args.overwrite, tokenizer=tok)
    size = emulator.manifest["size"]
    print(f"emulator written to {args.out}: method {args.method}, kept {size['keep_achieved']:.3f} of the middle block "
          f"({size['middle_params_kept']:,} of {size['middle_params_original']:,} parameters); "
          f"load {t_load:.1f} s, compress {t_compress:.1f} s on {device} ({args.dtype})")
    return 0


def cmd_plugin(args) -> int:
    from .artifacts import atomic_directory, claim_output, plug_in, refuse_existing
    from .modeling import load_model
    from .progress import stage

    refuse_existing(args.out, args.overwrite)  # cheap checks before the model loads
    check_adapter_folder(args.adapter)
    k = owner_split(args)
    with claim_output(args.out, args.overwrite):
        with stage(f"loading model {args.model}"):
            model, tok = load_model(args.model)
        plug_in(model, args.adapter, k=k, max_change=args.max_change)
        with stage(f"writing {args.out}"), atomic_directory(args.out, args.overwrite) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    print(f"plug-in model written to {args.out}")
    return 0


def cmd_info(args) -> int:
    from .artifacts import describe, verify

    manifest, checked = verify(args.path)  # refuses what a loader would refuse before reading weights
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(checked)
        print(describe(manifest))
    return 0


COMMANDS = {"compress": cmd_compress, "plugin": cmd_plugin, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    from .artifacts import ArtifactError, printable
    from .calib import CalibrationError
    from .modeling import ModelLoadError
    from .registry import UnsupportedModelError
    from .split import SplitError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from .progress import quiet_third_party

    quiet_third_party(args.verbose)
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    expected = (ArtifactError, CalibrationError, ModelLoadError, UnsupportedModelError, SplitError, UsageError,
                FileNotFoundError)
    try:
        from .finetune import CheckpointConflictError
        from .pipeline import PipelineSettingsError
        from .tasks import TaskDataError  # (data owner's errors, when present)
        expected = expected + (TaskDataError, CheckpointConflictError, PipelineSettingsError)
    except ImportError:
        pass
    try:
        code = handler(args)
        sys.stdout.flush()  # inside the try: a closed pipe (`gradot info emu | head -3`) is reported here
        return code
    except expected as exc:
        print(f"gradot {args.command}: error: {printable(str(exc))}", file=sys.stderr)  # one line, no escapes
        return 2
    except KeyboardInterrupt:
        print(f"gradot {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader stopped reading: not an error of ours. Point stdout at /dev/null so the
        # interpreter's final flush does not raise again, and exit as a program killed by SIGPIPE.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13
    except BaseException as exc:
        # A Rust panic in a library (a shipped tokenizer's regex on a long word) is a BaseException.
        if type(exc).__name__ != "PanicException":
            raise
        print(f"gradot {args.command}: error: a library panicked (a shipped tokenizer on unusual text?): "
              f"{printable(' '.join(str(exc).split()))[:300]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
