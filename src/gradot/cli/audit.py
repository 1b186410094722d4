"""``gradot audit``: the model owner heals a copy of its emulator as a data owner could, and reads
how close it gets to the original (``gradot.analysis.audit``)."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UsageError

_SUFFIX = {"": 1, "k": 1024, "m": 1024 ** 2}


def token_count(text: str) -> int:
    """``262144``, ``256k`` or ``1M`` (k = 1024 tokens)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not m:
        raise UsageError(f"--budget: expected a token count such as 32768, 256k or 1M, got {text!r}")
    return int(m.group(1)) * _SUFFIX[m.group(2).lower()]


def add_audit(sub, model_option) -> None:
    from ..analysis.audit import DEFAULT_TASKS
    from ..analysis.healing import TRAINABLE, HealConfig

    p = sub.add_parser("audit", help="model owner: heal a copy of an emulator on public text and measure how "
                                     "close it gets to the original")
    p.add_argument("emulator", help="emulator directory")
    model_option(p)
    p.add_argument("--budget", default="256k", help="largest attack budget in tokens (256k, 1M, ...); measured "
                                                   "also at 0, ÷64 and ÷8 of it")
    p.add_argument("--text", nargs="+", help="public text the attacker trains on (.txt/.raw, JSONL with 'text' or "
                                             "'article', gzipped JSONL, Alpaca-style JSON); default: RACE train "
                                             "articles, WikiText-2 valid, tinyshakespeare and Alpaca from the data folder")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help="zero-shot tasks measured at each budget, "
                                                                    "comma-separated, or 'none'")
    p.add_argument("--limit", type=int, default=500, help="questions per task")
    p.add_argument("--ppl-text", help="perplexity text (default: WikiText-2 test from the data folder)")
    p.add_argument("--ppl-tokens", type=int, default=32_768, help="tokens of --ppl-text scored")
    p.add_argument("--ppl-len", type=int, default=512, help="tokens per perplexity sequence")
    p.add_argument("--seq-len", type=int, default=HealConfig.seq_len, help="the attacker's sequence length")
    p.add_argument("--batch-size", type=int, default=HealConfig.batch_size, help="the attacker's sequences per step")
    p.add_argument("--lr", type=float, default=HealConfig.lr, help="the attacker's AdamW learning rate")
    p.add_argument("--train", choices=TRAINABLE, default="all", help="which parameters the attacker trains")
    p.add_argument("--no-reference", action="store_true", help="skip the random-middle reference (half the time; "
                                                               "no 'protected' share)")
    p.add_argument("--data-dir", help="data folder (tasks, default texts)")
    p.add_argument("--out", help="report folder (default: audit-<emulator folder name>); a rerun resumes")
    p.set_defaults(handler=cmd_audit)


def _inputs(args):
    """Every input checked before the model loads: (config, text files, ppl text, tasks, out)."""
    from ..artifacts import verify
    from ..errors import HealError
    from ..analysis.healing import HealConfig, default_attack_files
    from ..analysis.audit import audit_budgets

    verify(args.emulator)
    budget = token_count(args.budget)
    recipe = dict(lr=args.lr, train=args.train, seq_len=args.seq_len, batch_size=args.batch_size)
    config = HealConfig(budgets=audit_budgets(budget, HealConfig(**recipe).tokens_per_step), **recipe)
    if args.limit < 1 or args.ppl_len < 2 or args.ppl_tokens < args.ppl_len:
        raise UsageError("--limit must be >= 1, --ppl-len >= 2 and --ppl-tokens >= --ppl-len")
    data = None
    if not args.text or not args.ppl_text or args.tasks != "none":
        from ..evaluation.tasks import resolve_data_dir

        data = resolve_data_dir(args.data_dir)
    files = [Path(f) for f in args.text] if args.text else default_attack_files(data)
    ppl_text = Path(args.ppl_text) if args.ppl_text else data / "text" / "wikitext-2-raw" / "wiki.test.raw"
    for f in files + [ppl_text]:
        if not f.is_file():
            raise HealError(f"text file not found: {f}")
    tasks = [] if args.tasks == "none" else [t for t in args.tasks.split(",") if t]
    from ..evaluation.lmeval import EVAL_TASKS

    unknown = [t for t in tasks if t not in EVAL_TASKS or t == "wikitext"]
    if unknown:
        raise UsageError(f"--tasks: unknown {', '.join(unknown)}; known: {', '.join(t for t in EVAL_TASKS if t != 'wikitext')}")
    out = Path(args.out or f"audit-{Path(args.emulator).resolve().name}")
    return config, files, ppl_text, tasks, data, out


def cmd_audit(args) -> int:
    from ..artifacts import load_emulator
    from ..analysis.audit import check_fits, measurer, perplexity_sequences, run_audit, settings_record
    from ..modeling import load_model
    from ..progress import stage

    config, files, ppl_text, tasks, data, out = _inputs(args)
    with stage(f"loading model {args.model} and emulator {args.emulator}"):
        model, tok = load_model(args.model, revision=args.revision)
        emulator = load_emulator(args.emulator)
    check_fits(emulator.manifest, model)
    measure = measurer(tok, perplexity_sequences(tok, ppl_text, args.ppl_tokens, args.ppl_len), tasks, args.limit, data)
    settings = settings_record(config, files, tasks, args.limit, args.ppl_tokens, args.ppl_len)
    budgets = ", ".join(f"{b:,}" for b in config.budgets)
    print(f"auditing {args.emulator}: healing on {len(files)} text file(s) at budgets {budgets} tokens "
          f"({'and the random-middle reference' if not args.no_reference else 'no reference'}); report in {out}",
          flush=True)
    run_audit(model, tok, emulator, files, config, measure, out, settings, reference=not args.no_reference,
              progress=lambda message: print(f"audit: {message}", flush=True))
    print((out / "audit.md").read_text())
    return 0
