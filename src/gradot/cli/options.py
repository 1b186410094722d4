"""Option groups and argument types shared by the ``gradot`` sub-commands (``cli`` and ``cli_data``),
and the resolvers that turn their values into what the library takes. Errors are ``UsageError``s
(exit code 2 in ``cli.main``). Method options are generated from the registered methods' config
dataclasses (``methods.REGISTRY``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UsageError

def keep_fraction(value: str) -> float:
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


positive_int = int_at_least(1, "a positive integer")


def add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (embedded SmolLM2-135M), a local Hugging Face model folder, a .gguf file, or a "
                        "Hugging Face Hub name ORG/NAME (downloaded into the HF cache; HF_HUB_OFFLINE=1 reads only it)")
    p.add_argument("--revision", default=None,
                   help="with a Hub name: the branch, tag or commit to load (default: main)")


DTYPES = ("float32", "bfloat16", "float16")


def add_device(p: argparse.ArgumentParser) -> None:
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


def add_placement(p: argparse.ArgumentParser) -> None:
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


def add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default=None,
                   help="calibration text (.txt/.raw or JSONL with 'text'); default: WikiText-2 valid from the shared data")
    p.add_argument("--calib-sequences", type=positive_int, default=32, help="number of calibration sequences")
    p.add_argument("--calib-len", type=positive_int, default=256, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=positive_int, default=4, help="calibration batch size")


def positive_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return x


def non_negative_float(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}") from None
    if not 0 <= x < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}")
    return x


def add_split_arguments(p: argparse.ArgumentParser, emulator: bool = True) -> None:
    """The model owner's own record of its split, for plugging an adapter into the original model
    (``emulator``: also offer --emulator, where that option is not taken)."""
    g = p.add_mutually_exclusive_group()
    if emulator:
        g.add_argument("--emulator", default=None,
                       help="the emulator you shipped for this adapter: its recorded split k decides which layers "
                            "are replaced (never the split the adapter claims)")
    g.add_argument("--adapter-layers", type=positive_int, default=None,
                   help="the split k you compressed with (default 2, as in compress); an adapter claiming "
                        "another is refused")
    from ..artifacts import DEFAULT_MAX_CHANGE, PLAUSIBLE_CHANGE

    p.add_argument("--max-change", type=non_negative_float, default=DEFAULT_MAX_CHANGE, metavar="R",
                   help=f"refuse an adapter with a tensor moved more than R times its original norm (default: "
                        f"{DEFAULT_MAX_CHANGE:g}; 0: no bound, a warning above {PLAUSIBLE_CHANGE:g})")


def owner_split(args) -> int:
    """k for plugging into the original model: the shipped emulator's recorded split, else
    --adapter-layers, else compress's default."""
    from ..artifacts import emulator_split

    if getattr(args, "emulator", None):
        return emulator_split(args.emulator)
    return args.adapter_layers or 2


def add_method_choice(p: argparse.ArgumentParser, default: str = "uniform") -> None:
    """``--method``: one of the registered methods, each described by its own one-line help."""
    from ..methods import REGISTRY

    p.add_argument("--method", default=default, choices=sorted(REGISTRY),
                   help="; ".join(f"{name}: {m.help}" for name, m in REGISTRY.items()))


def add_method_options(p: argparse.ArgumentParser) -> None:
    """Every registered method's options, generated from its config dataclass: one group per set
    of methods that read them ("gradot / wanda"), each option offered once."""
    from ..methods import method_options

    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for name, (f, readers) in method_options().items():
        key = tuple(readers)
        if key not in groups:
            groups[key] = p.add_argument_group(" / ".join(readers))
        meta = f.metadata
        flag = "--" + name.replace("_", "-")
        if meta["kind"] is bool:
            groups[key].add_argument(flag, action="store_true", help=meta["help"])
            continue
        kind = meta["kind"]
        if meta["minimum"] is not None:
            low = meta["minimum"]
            kind = int_at_least(low, "a positive integer" if low == 1 else f"an integer >= {low}")
        groups[key].add_argument(flag, type=kind, default=f.default, choices=meta["choices"],
                                 metavar=meta["metavar"], help=meta["help"])


def method_config(args):
    """The config of ``args.method`` from the parsed options: its settings' errors before any model loads."""
    from ..methods import get, make_config

    return make_config(get(args.method).config, args.keep, vars(args))
