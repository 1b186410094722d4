"""``gradot`` command line: a thin layer over the library (one sub-command per role's step)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

from .. import __version__
from .audit import add_audit
from .data_owner import add_commands
from .options import (  # noqa: F401  (resolve_device re-exported)
    add_calibration,
    add_device,
    add_method_choice,
    add_method_options,
    add_model,
    add_placement,
    add_split_arguments,
    check_adapter_folder,
    keep_fraction,
    method_config,
    owner_split,
    positive_int,
    resolve_device,
    resolve_dtype,
    resolve_placement,
)
from ..errors import GradotError, UsageError, printable  # noqa: F401  (UsageError re-exported)


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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="gradot", description=__doc__)
    parser.add_argument("--version", action="version", version=f"gradot {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log progress details, and third-party warnings and progress bars that are hidden "
                             "by default (give it before the command: gradot -v compress ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    from ..methods import DEFAULT_KEEP

    p = sub.add_parser("compress", help="model owner: build an emulator of the model's middle block")
    add_model(p)
    add_method_choice(p)
    p.add_argument("--keep", type=keep_fraction, default=DEFAULT_KEEP,
                   help="fraction of middle-block parameters to keep, in (0, 1] (default chosen on the transfer frontier: docs/transfer.md)")
    p.add_argument("--adapter-layers", type=positive_int, default=2, help="k: bottom k and top k layers form the adapter")
    p.add_argument("--out", required=True, help="output directory of the emulator")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_device(p)
    add_placement(p)
    add_calibration(p)
    add_method_options(p)

    p = sub.add_parser("plugin", help="model owner: plug a fine-tuned adapter into the original model")
    add_model(p)
    p.add_argument("--adapter", required=True, help="adapter directory returned by the data owner")
    p.add_argument("--out", required=True, help="output directory for the plug-in model (Hugging Face format)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_split_arguments(p)

    p = sub.add_parser("info", help="describe an emulator or adapter directory")
    p.add_argument("path", help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the raw manifest")

    add_commands(sub)  # the data owner's commands and the pipeline
    add_audit(sub, add_model)  # the model owner's healing audit
    return parser


# ---------------------------------------------------------------------------------------------


def cmd_compress(args) -> int:
    from ..artifacts import claim_output, refuse_existing, save_emulator
    from ..methods import check_calibration, compress
    from ..modeling import load_model
    from ..progress import stage

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    placement = resolve_placement(args)
    # Cheap checks first: none of these should wait for the model to load.
    refuse_existing(args.out, args.overwrite)
    method_config(args)  # settings the method cannot combine
    check_calibration(args.method, args.calib)
    if placement:
        device = f"device map {args.device_map}"
    with claim_output(args.out, args.overwrite):  # one writer per --out, refused before compressing
        t0 = time.perf_counter()
        with stage(f"loading model {args.model}"):
            model, tok = load_model(args.model, dtype=dtype, device="cpu" if placement else device,
                                    revision=args.revision, **placement)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        emulator = compress(model, tok, args.method, args.keep, vars(args))
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
    from ..artifacts import atomic_directory, claim_output, plug_in, refuse_existing
    from ..modeling import load_model
    from ..progress import stage

    refuse_existing(args.out, args.overwrite)  # cheap checks before the model loads
    check_adapter_folder(args.adapter)
    k = owner_split(args)
    with claim_output(args.out, args.overwrite):
        with stage(f"loading model {args.model}"):
            model, tok = load_model(args.model, revision=args.revision)
        plug_in(model, args.adapter, k=k, max_change=args.max_change)
        with stage(f"writing {args.out}"), atomic_directory(args.out, args.overwrite) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    print(f"plug-in model written to {args.out}")
    return 0


def cmd_info(args) -> int:
    from ..artifacts import describe, verify

    manifest, checked = verify(args.path)  # refuses what a loader would refuse before reading weights
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        print(checked)
        print(describe(manifest))
    return 0


COMMANDS = {"compress": cmd_compress, "plugin": cmd_plugin, "info": cmd_info}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from ..progress import quiet_third_party

    quiet_third_party(args.verbose)
    handler = COMMANDS.get(args.command) or getattr(args, "handler", None)
    try:
        code = handler(args)
        sys.stdout.flush()  # inside the try: a closed pipe (`gradot info emu | head -3`) is reported here
        return code
    except (GradotError, FileNotFoundError) as exc:  # the library's errors: one line, exit code 2
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
