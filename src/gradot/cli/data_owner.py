"""``gradot finetune``, ``gradot eval`` and ``gradot pipeline``: the data owner's side and the scoreboard."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .options import (
    add_calibration,
    add_device,
    add_method_options,
    add_model,
    add_split_arguments,
    check_adapter_folder,
    int_at_least,
    keep_fraction,
    owner_split,
    positive_int,
    resolve_device,
    resolve_dtype,
)
from ..errors import UsageError


def _task_list(value: str, known: tuple[str, ...]) -> list[str]:
    names = [t.strip() for t in value.split(",") if t.strip()]
    unknown = [t for t in names if t not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown task(s) {unknown or value!r}; known: {', '.join(known)}")
    return names


def _task_names(value: str) -> list[str]:
    """Tasks to evaluate: gradot's eight and wikitext, or any task the harness's registry knows
    (checked once the registry is read, before the model loads)."""
    names = [t.strip() for t in value.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"no task in {value!r}")
    return names


def _train_tasks(value: str) -> list[str]:
    """Tasks with training data (the pipeline fine-tunes on each): the eight tasks."""
    from ..evaluation.tasks import TASK_NAMES

    return _task_list(value, TASK_NAMES)


def _train_task(value: str) -> str:
    from ..evaluation.tasks import TASK_NAMES

    if value not in TASK_NAMES:
        raise argparse.ArgumentTypeError(f"unknown task {value!r}; known: {', '.join(TASK_NAMES)}")
    return value


def _training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--epochs", type=float, default=1.0, help="training epochs")
    g.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs decide)")
    g.add_argument("--train-batch-size", type=int, default=8, help="examples per step")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: per-task default)")
    g.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the adapter layers (0: train them fully)")
    g.add_argument("--max-length", type=int_at_least(2, "an integer >= 2"), default=256,
                   help="tokens per training example; longer ones lose the start of the prompt (RACE articles "
                        "run to 300-600 tokens: raise it for them)")
    g.add_argument("--seed", type=int, default=0, help="random seed")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 mixed precision (autocast; Ampere or newer GPU, or CPU autocast without a GPU). "
                        "Training runs on a CUDA GPU whenever one is visible (transformers' Trainer)")


def add_commands(sub) -> None:
    from ..methods import DEFAULT_KEEP, REGISTRY

    p = sub.add_parser("finetune", help="data owner: fine-tune the emulator's adapter on a task or your own data")
    p.add_argument("--emulator", required=True, help="emulator directory from the model owner")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", type=_train_task, help="one of the eight offsite-tuning tasks (train split)")
    src.add_argument("--data", help="your own data: .txt, JSONL with 'text', or Alpaca-style instruction JSON")
    p.add_argument("--data-dir", default=None, help="folder with the task files (default: the shared data)")
    p.add_argument("--train-limit", type=positive_int, default=None,
                   help="use only the first N training rows (default: all; PIQA has 16,113: about 2,000 steps)")
    p.add_argument("--out", required=True, help="adapter output directory (returned to the model owner)")
    p.add_argument("--checkpoints", default=None, help="checkpoint folder (default: OUT.checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep the checkpoints after a successful run (default: deleted once the adapter is written)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output directory (and, without --resume, earlier checkpoints)")
    _training_arguments(p)
    p.set_defaults(handler=cmd_finetune)

    p = sub.add_parser("eval", help="evaluate a model, an emulator, or a model with an adapter plugged in")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="'default', a local model folder, a .gguf file, or a Hub name ORG/NAME")
    p.add_argument("--revision", default=None, help="with a Hub name: the branch, tag or commit to load")
    target.add_argument("--emulator", help="emulator directory")
    p.add_argument("--adapter", default=None, help="adapter directory to plug in first (into --model or --emulator)")
    p.add_argument("--tasks", type=_task_names, default=None,
                   help="comma-separated tasks: gradot's eight (local files) and 'wikitext' (perplexity), or any "
                        "task or group of lm-evaluation-harness (its registry; it downloads their data)")
    p.add_argument("--include-path", default=None, help="a folder of your own lm-evaluation-harness task yamls")
    p.add_argument("--data", default=None,
                   help="your own held-out file (the formats finetune --data reads): answer loss and perplexity")
    p.add_argument("--max-length", type=int_at_least(2, "an integer >= 2"), default=256,
                   help="with --data: tokens per example, as finetune --max-length")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="examples per task, or rows of --data (default: all)")
    p.add_argument("--data-dir", default=None, help="folder with the task files")
    p.add_argument("--eval-batch-size", type=positive_int, default=8,
                   help="examples per forward pass when scoring (memory, not results, depends on it)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    add_split_arguments(p, emulator=False)
    add_device(p)
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("pipeline", help="the whole protocol per task: Full ZS/FT, Emu ZS/FT, Plug-in, Δ")
    add_model(p)
    p.add_argument("--method", default="uniform",
                   help=f"emulator method(s), comma-separated, from: {', '.join(sorted(REGISTRY))}")
    p.add_argument("--tasks", type=_train_tasks, default="piqa", help="comma-separated tasks (with training data)")
    p.add_argument("--keep", type=keep_fraction, default=DEFAULT_KEEP, help="fraction of middle-block parameters to keep")
    p.add_argument("--adapter-layers", type=positive_int, default=2, help="k bottom and k top layers form the adapter")
    p.add_argument("--full-ft", action="store_true", help="also fine-tune the full model (the upper bound)")
    p.add_argument("--full-lr", type=float, default=None,
                   help="learning rate of Full FT (default: FULL_LR, 2e-5); --lr sets only the adapters'")
    p.add_argument("--no-adapter-ft", dest="adapter_ft", action="store_false",
                   help="skip the Adapter FT row (the adapter layers trained on the original itself, the "
                        "denominator of transfer); saves one fine-tuning of the full model per task")
    p.add_argument("--limit", type=positive_int, default=None, help="validation examples per task (default: all)")
    p.add_argument("--train-limit", type=positive_int, default=1000, help="training rows per task")
    p.add_argument("--data-dir", default=None, help="folder with the task files")
    p.add_argument("--eval-batch-size", type=positive_int, default=8,
                   help="examples per forward pass when scoring (memory, not results, depends on it)")
    p.add_argument("--out", default="runs/pipeline", help="output folder (cells are cached here; rerun to resume)")
    p.add_argument("--report-only", action="store_true",
                   help="write the table, JSON and plot from the cells already computed (missing ones show '–'); "
                        "loads no model, computes nothing")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each fine-tuning run's checkpoints after its cell is done (default: deleted)")
    add_device(p)
    _training_arguments(p)
    add_calibration(p)
    add_method_options(p)
    p.set_defaults(handler=cmd_pipeline)

    _add_federate(sub)
    _add_data(sub)


def _records(args):
    from ..corpora import load_corpus
    from ..finetune import task_records
    from ..evaluation.tasks import load_task

    if args.task:
        return task_records(load_task(args.task, "train", data_dir=args.data_dir, limit=args.train_limit))
    records = load_corpus(args.data, limit=args.train_limit)
    if isinstance(records, str):  # a plain-text file is one long text (cut into windows when tokenized)
        return [records]
    return [r if isinstance(r, str) else (r.prompt, r.continuation()) for r in records]


def _held_out_records(path: str, limit: int | None):
    """``eval --data``'s records, read as ``finetune --data`` reads them."""
    from argparse import Namespace

    return _records(Namespace(task=None, data=path, train_limit=limit))


def cmd_finetune(args) -> int:
    import os

    from ..artifacts import claim_output, refuse_existing

    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`, the main process holds --out
        refuse_existing(args.out, args.overwrite)
        return _finetune(args)
    with claim_output(args.out, args.overwrite):  # one writer per --out, refused before training, not after
        return _finetune(args)


def _finetune(args) -> int:
    from ..artifacts import load_emulator, load_emulator_tokenizer, save_adapter
    from ..finetune import FinetuneConfig, finetune_adapter, remove_checkpoints
    from ..progress import stage

    checkpoints = args.checkpoints or f"{args.out}.checkpoints"
    from accelerate import PartialState

    main_process = PartialState().is_main_process  # under `accelerate launch`, one process writes and deletes
    if args.overwrite and not args.resume and main_process:  # starting over: earlier checkpoints would be refused
        remove_checkpoints(checkpoints)
    records = _records(args)  # bad data fails before the emulator loads
    with stage(f"loading emulator {args.emulator}"):
        emulator = load_emulator(args.emulator)
        tok = load_emulator_tokenizer(args.emulator)
    cfg = FinetuneConfig(output_dir=checkpoints, task=args.task,
                         learning_rate=args.lr, epochs=args.epochs, max_steps=args.max_steps,
                         batch_size=args.train_batch_size, lora_r=args.lora_r, seed=args.seed, resume=args.resume,
                         bf16=args.bf16, max_length=args.max_length)
    emulator, stats = finetune_adapter(emulator, tok, records, cfg)
    if not main_process:
        return 0
    save_adapter(emulator, args.out, training={k: v for k, v in stats.items() if k != "loss_history"},
                 overwrite=args.overwrite)
    if not args.keep_checkpoints:  # the adapter is written: they could only resume a finished run
        remove_checkpoints(checkpoints)
    speed = (f", {stats['seconds_per_step']:.2f} s/step, {stats['tokens_per_second']:.0f} tokens/s"
             if stats["steps_this_run"] and stats["tokens_per_second"] else " (no step to run: resumed a finished run)")
    loss = f"{stats['train_loss']:.4f}" if stats["train_loss"] is not None else "n/a"
    kept = f"; checkpoints kept in {checkpoints}" if args.keep_checkpoints else ""
    print(f"adapter written to {args.out}: {stats['steps']} steps, mean training loss {loss}{speed}{kept}")
    return 0


def cmd_eval(args) -> int:
    from ..artifacts import load_emulator, load_emulator_tokenizer, plug_in, plug_into_emulator
    from ..evaluation.lmeval import evaluate
    from ..evaluation.lmeval import EVAL_TASKS, check_harness_tasks
    from ..modeling import load_model
    from ..progress import stage

    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    if not args.tasks and not args.data:
        raise UsageError("nothing to evaluate: give --tasks, --data, or both")
    # Everything that can fail without the model fails first: the adapter, the data, the task names.
    if args.adapter:
        check_adapter_folder(args.adapter)
    if args.emulator and args.adapter_layers:
        raise UsageError("--adapter-layers: with --emulator, the split is the emulator's")
    records = _held_out_records(args.data, args.limit) if args.data else None
    ours = [t for t in args.tasks or [] if t in EVAL_TASKS]
    harness = [t for t in args.tasks or [] if t not in EVAL_TASKS]
    if harness:
        check_harness_tasks(harness, args.include_path)
    if ours:
        from ..evaluation.task_data import TEXT, require_task_data

        require_task_data([TEXT if t == "wikitext" else t for t in ours], args.data_dir, splits=("validation",))
    with stage(f"loading {'emulator ' + args.emulator if args.emulator else 'model ' + args.model}"
               + (f" with adapter {args.adapter}" if args.adapter else "")):
        if args.emulator:
            emulator = load_emulator(args.emulator, device=device)
            tok = load_emulator_tokenizer(args.emulator)
            if args.adapter:
                plug_into_emulator(emulator, args.adapter, max_change=args.max_change)
            model = emulator.model.to(dtype)
        else:
            model, tok = load_model(args.model, dtype=dtype, device=device, revision=args.revision)
            if args.adapter:
                plug_in(model, args.adapter, k=owner_split(args), max_change=args.max_change)
    results = {}
    if args.tasks:
        results = evaluate(model, tok, args.tasks, data_dir=args.data_dir, limit=args.limit,
                           batch_size=args.eval_batch_size, include_path=args.include_path)
        for task, metrics in results.items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            print(f"{task}: {shown}")
    if records is not None:
        from ..evaluation.held_out import held_out_loss

        loss = held_out_loss(model, tok, records, batch_size=args.eval_batch_size, max_length=args.max_length)
        results[f"data:{args.data}"] = loss
        print(f"{args.data}: answer loss {loss['answer_loss']:.4f} ± {loss['answer_loss_stderr']:.4f}, "
              f"perplexity {loss['perplexity']:.2f} ({loss['n']} examples, {loss['tokens']} answer tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def cmd_pipeline(args) -> int:
    from ..methods import REGISTRY, compress_option_names
    from ..modeling import load_model
    from ..pipeline import Pipeline, PipelineConfig, cell_settings, claim_output_folder

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in REGISTRY]
    if unknown or not methods:
        raise UsageError(f"unknown method(s) {unknown}; known: {', '.join(sorted(REGISTRY))}")
    cfg = PipelineConfig(
        model=args.model, revision=args.revision, methods=methods, tasks=args.tasks, keep=args.keep, out=args.out,
        full_ft=args.full_ft,
        adapter_ft=args.adapter_ft,
        limit=args.limit, train_limit=args.train_limit, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.train_batch_size, eval_batch_size=args.eval_batch_size, learning_rate=args.lr,
        full_learning_rate=args.full_lr,
        max_length=args.max_length,
        lora_r=args.lora_r, seed=args.seed, data_dir=args.data_dir, device=resolve_device(args.device),
        bf16=args.bf16, report_only=args.report_only, keep_checkpoints=args.keep_checkpoints,
        compress_args={k: getattr(args, k) for k in compress_option_names()},
        dtype=args.dtype,
        command="gradot " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
    )
    # Settings that the output folder's cells were not computed with, and missing task data, fail
    # here, before the model loads (the record itself is written before the first cell is computed).
    claim_output_folder(Path(cfg.out), cell_settings(cfg), record=False)
    if not args.report_only:
        from ..evaluation.task_data import TEXT, require_task_data

        # the default calibration text (WikiText-2) lives in the data folder too
        require_task_data(cfg.tasks + ([] if args.calib else [TEXT]), args.data_dir)
    model, tok = None, None
    if not args.report_only:
        from ..progress import stage

        with stage(f"loading model {args.model}"):
            model, tok = load_model(args.model, dtype=resolve_dtype(args.dtype), device=cfg.device,
                                    revision=args.revision)
    info = Pipeline(cfg, model, tok).run()
    print((Path(args.out) / "results.md").read_text())
    print(f"results: {args.out}/results.md, results.json, results.png")
    return 0 if info else 1


# ---------------------------------------------------------------------------------------------
# gradot data fetch: the task data from the Hugging Face Hub (gradot.evaluation.task_data)


def _fetch_names(value: str) -> list[str]:
    from ..evaluation.task_data import SOURCES

    return _task_list(value, tuple(SOURCES))


def _add_data(sub) -> None:
    from ..evaluation.task_data import SOURCES

    p = sub.add_parser("data", help="task data: fetch the eight tasks from the Hugging Face Hub")
    dsub = p.add_subparsers(dest="data_command", required=True)
    f = dsub.add_parser("fetch", help="download the tasks' datasets (pinned revisions) into the local layout; "
                                      "on an offline machine, copy the folder and pass --data-dir")
    f.add_argument("--tasks", type=_fetch_names, default=",".join(SOURCES),
                   help="comma-separated tasks (and 'wikitext', the calibration and perplexity text)")
    f.add_argument("--to", default=None, help="folder to fill (default: ~/.cache/gradot/data, where runs look last)")
    f.set_defaults(handler=cmd_data_fetch)


def cmd_data_fetch(args) -> int:
    from ..evaluation.task_data import FETCHED_RECORD, fetch_task_data

    to = fetch_task_data(args.tasks, args.to)
    print(f"task data in {to} ({', '.join(args.tasks)}; revisions and SHA-256 of every file in {to / FETCHED_RECORD})")
    return 0


# ---------------------------------------------------------------------------------------------
# gradot federate: many data owners, one adapter (Flower; gradot.federated)


def _federation_arguments(p: argparse.ArgumentParser) -> None:
    from ..artifacts import DEFAULT_MAX_CHANGE
    g = p.add_argument_group("federation (the model owner's settings, sent to every client each round)")
    g.add_argument("--rounds", type=positive_int, default=3, help="federated rounds")
    g.add_argument("--local-steps", type=int_at_least(0, "an integer >= 0"), default=10,
                   help="optimizer steps each client runs per round (0: --local-epochs decide)")
    g.add_argument("--local-epochs", type=float, default=1.0, help="passes over its data per round when --local-steps is 0")
    g.add_argument("--lr", type=float, default=None,
                   help="clients' learning rate (AdamW restarts every round; default: gradot finetune's, 3e-4)")
    g.add_argument("--train-batch-size", type=positive_int, default=8, help="examples per step")
    g.add_argument("--max-length", type=int_at_least(2, "an integer >= 2"), default=256, help="tokens per example")
    g.add_argument("--mu", type=float, default=0.0, help="FedProx proximal weight (0: plain FedAvg)")
    g.add_argument("--min-clients", type=positive_int, default=2,
                   help="quorum: a round with fewer accepted updates keeps the previous adapter")
    g.add_argument("--round-timeout", type=float, default=None,
                   help="seconds the server waits for a round's replies (silent clients count as failed; default "
                        "600, 4-6x a measured round of the default model, see docs/federated.md)")
    g.add_argument("--secagg", action="store_true",
                   help="Flower's SecAgg+ (the server sees only the sum of the updates, never one client's)")
    g.add_argument("--secagg-clip", type=float, default=1.0,
                   help="SecAgg+ clipping range of each update value (updates are weight differences, ~1e-3)")
    g.add_argument("--seed", type=int, default=0, help="seed of the split and of local training (plus the round)")
    g.add_argument("--max-change", type=float, default=DEFAULT_MAX_CHANGE,
                   help="leave out an update, and drop a round whose aggregate, moves a tensor more than this many "
                        "times its norm (plugin's default bound; 0: only warn above 1)")
    g.add_argument("--clip", type=float, default=None,
                   help="clip each client's update to this x the global adapter's L2 norm (Flower's fixed clipping; "
                        "default 0.02, 5x an honest round of the default model, see docs/federated.md; 0: off)")
    g.add_argument("--max-examples", type=int_at_least(0, "an integer >= 0"), default=None,
                   help="refuse a client claiming more examples than this (simulate: default the largest share; "
                        "app: default 0, no fixed cap)")
    g.add_argument("--max-examples-ratio", type=float, default=None,
                   help="refuse a client claiming more than this x the round's median count (default 4; 0: off)")
    g.add_argument("--aggregate", choices=("fedavg", "median", "trimmed-mean", "krum"), default="fedavg",
                   help="aggregation rule (Flower's FedAvg, FedMedian, FedTrimmedAvg, Krum); SecAgg+: fedavg only")


def _add_federate(sub) -> None:
    """``gradot federate simulate|app`` (the handlers: ``gradot.federated.commands``)."""
    from ..federated.commands import cmd_app, cmd_simulate
    from ..federated.partition import PARTITIONS

    p = sub.add_parser("federate", help="many data owners, one adapter: federated offsite-tuning on Flower")
    fsub = p.add_subparsers(dest="federate_command", required=True)

    s = fsub.add_parser("simulate", help="server and N clients in this process (Flower apps, in-process nodes)")
    s.add_argument("--emulator", required=True, help="the emulator folder (every simulated data owner gets it)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--task", help="a task's train split, split over the clients")
    src.add_argument("--data", help="your own data file (.txt, JSONL with 'text', Alpaca JSON), split IID")
    s.add_argument("--data-dir", default=None, help="folder with the task files (default: the shared data)")
    s.add_argument("--train-limit", type=positive_int, default=None, help="use the first N training rows in all")
    s.add_argument("--num-clients", type=positive_int, default=3, help="simulated data owners")
    s.add_argument("--partition", choices=PARTITIONS, default="iid",
                   help="iid: equal random shares; label: label skew, Dirichlet(--alpha) per label (tasks only)")
    s.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of --partition label")
    s.add_argument("--out", required=True, help="output folder: adapter/ (the aggregate) and federation.json")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    s.add_argument("--plug-model", default=None,
                   help="also plug the aggregate into this model ('default', a folder, a .gguf) and write OUT/plugged")
    _federation_arguments(s)
    s.set_defaults(handler=cmd_simulate)

    a = fsub.add_parser("app", help="write the Flower App folder for `flwr run` (deployment runtime)")
    a.add_argument("folder", help="folder to write pyproject.toml into")
    a.add_argument("--emulator", required=True, help="the model owner's emulator folder (absolute path recommended)")
    a.add_argument("--out", required=True, help="where the server writes adapter/ and federation.json")
    a.add_argument("--min-available", type=positive_int, default=2, help="SuperNodes to wait for before round 1")
    _federation_arguments(a)
    a.set_defaults(handler=cmd_app)
