"""lm-evaluation-harness task configs for the LOCAL task files, and an in-memory ``evaluate``.

The harness's own task yamls download from the Hugging Face hub. Here each task's split is
read with :mod:`gradot.evaluation.tasks` (the same prompts the fine-tuner trains on, checked against
the harness's yamls in the tests), written once to a normalized JSONL in a cache folder
(one row per example: ``query``, ``choices``, ``gold``) and described by a config dict:

    {"task": "gradot_arc_easy", "dataset_path": "json",
     "dataset_kwargs": {"data_files": {"validation": "/abs/.../arc_easy-validation-....jsonl"}},
     "output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
     "doc_to_target": "gold", "target_delimiter": " ", "metric_list": [acc, acc_norm]}

which ``lm_eval.simple_evaluate(tasks=[config])`` and ``TaskManager.load`` accept. Paths are
absolute because the harness does not resolve relative ones. Task names carry a ``gradot_``
prefix so they never collide with (or get merged into) the harness's registered tasks.

WebQuestions uses the harness's own scheme: multiple choice over the gold answers with a
list ``gold`` (every answer correct) and the ``exact_match`` metric, 1 when greedy decoding
reproduces some gold answer. ``wikitext`` is WikiText-2 perplexity on the local
``text/wikitext-2-raw/wiki.test.raw``: documents split as the hub's
``EleutherAI/wikitext_document_level`` does, scored by ``loglikelihood_rolling`` with the
harness's own detokenizer and word counting (``word_perplexity``, ``byte_perplexity``,
``bits_per_byte``).

Everything is offline: no hub access (``HF_DATASETS_OFFLINE``/``HF_HUB_OFFLINE`` are set
before the harness loads data) and no scan of the harness's 10k+ task yamls. Any other task name
is run through the harness's own registry (:func:`harness_task_manager`), as ``lm-eval`` runs it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gradot.corpora import load_text
from gradot.evaluation.tasks import (
    TARGET_DELIMITER,
    TASK_NAMES,
    TASKS,
    Example,
    GenExample,
    load_task,
    resolve_data_dir,
    task_files,
)

__all__ = [
    "EVAL_TASKS",
    "HARNESS_PREFIX",
    "SCORERS",
    "WIKITEXT",
    "build_configs",
    "check_harness_tasks",
    "default_cache_dir",
    "evaluate",
    "example_to_doc",
    "harness_task_manager",
    "task_config",
    "wikitext_config",
    "wikitext_documents",
    "write_task_docs",
]

HARNESS_PREFIX = "gradot_"
WIKITEXT = "wikitext"
WIKITEXT_FILE = Path("text") / "wikitext-2-raw" / "wiki.test.raw"
#: Every name :func:`evaluate` accepts.
EVAL_TASKS: tuple[str, ...] = TASK_NAMES + (WIKITEXT,)

#: ``evaluate(scorer=...)``: gradot's FastHFLM, or the harness's own HFLM (the reference).
SCORERS = ("fast", "stock")

CACHE_DIR_ENV = "GRADOT_CACHE"  # the same variable as the model cache (gradot.modeling)


# --------------------------------------------------------------------------- cache files


def default_cache_dir() -> Path:
    """``$GRADOT_CACHE/lmeval`` or ``~/.cache/gradot/lmeval``."""
    root = os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "gradot"
    return Path(root).expanduser() / "lmeval"


def _cache_path(cache_dir: str | os.PathLike | None, stem: str, sources: Sequence[Path], limit: int | None) -> Path:
    """A file name unique to the source files, so two data folders never share a cache entry."""
    digest = hashlib.sha1("\n".join(str(p.resolve()) for p in sources).encode()).hexdigest()[:10]
    suffix = f"-limit{limit}" if limit is not None else ""
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return (folder / f"{stem}{suffix}-{digest}.jsonl").resolve()


def _write_if_changed(path: Path, rows: Sequence[dict]) -> Path:
    """Write JSONL atomically, leaving an identical file untouched.

    Untouched files keep their mtime, so ``datasets`` reuses its Arrow cache for them.
    """
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def example_to_doc(example: Example) -> dict[str, Any]:
    """The normalized row the configs read: ``query``, ``choices`` and ``gold``.

    ``gold`` is an index, or for webquestions the list of all choice indices (the harness
    treats a list target as "any of these").
    """
    gold: int | list[int] = list(example.golds) if isinstance(example, GenExample) else example.gold
    return {"query": example.prompt, "choices": list(example.choices), "gold": gold}


def write_task_docs(name: str, split: str = "validation", data_dir: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None, limit: int | None = None) -> Path:
    """Convert a task's split to the normalized JSONL; returns its absolute path."""
    rows = [example_to_doc(ex) for ex in load_task(name, split, data_dir, limit)]
    if not rows:
        raise ValueError(f"task {name!r} split {split!r} has no examples (limit={limit})")
    path = _cache_path(cache_dir, f"{name}-{split}", task_files(name, split, data_dir), limit)
    return _write_if_changed(path, rows)


# --------------------------------------------------------------------------- configs


def _metric(name: str) -> dict[str, Any]:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def task_config(name: str, split: str = "validation", data_dir: str | os.PathLike | None = None,
                cache_dir: str | os.PathLike | None = None, limit: int | None = None) -> dict[str, Any]:
    """A harness config dict for one of ``TASK_NAMES`` on the local files (zero-shot)."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(EVAL_TASKS)}")
    spec = TASKS[name]
    path = write_task_docs(name, split, data_dir, cache_dir, limit)
    return {
        "task": HARNESS_PREFIX + name,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {split: str(path)}},
        "validation_split": split,
        "output_type": spec.output_type,
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": TARGET_DELIMITER,
        "metric_list": [_metric(m) for m in spec.metrics],
        "metadata": {"version": 1.0, "harness_task": spec.harness_task, "source_split": split},
    }


def wikitext_documents(text: str) -> list[str]:
    """Split WikiText raw text into articles, as ``EleutherAI/wikitext_document_level`` does.

    A line that is a top-level heading (``" = Title = "``, not ``" = = Section = = "``)
    starts a new document; each document keeps its lines, heading included, joined by ``\\n``.
    """
    docs, lines = [], []
    for line in text.split("\n"):
        heading = line.replace("= = =", "===").replace("= =", "==").strip()
        if heading.startswith("= ") and heading.endswith(" ="):
            if "\n".join(lines).strip():
                docs.append("\n".join(lines))
            lines = []
        lines.append(line)
    if "\n".join(lines).strip():
        docs.append("\n".join(lines))
    return docs


def wikitext_config(data_dir: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                    path: str | os.PathLike | None = None, limit: int | None = None) -> dict[str, Any]:
    """A ``loglikelihood_rolling`` perplexity config on a local WikiText raw file.

    ``path`` defaults to ``<data_dir>/text/wikitext-2-raw/wiki.test.raw``; ``limit`` keeps the
    first documents. The harness's ``wikitext_detokenizer`` and ``process_results`` (words
    counted before detokenizing) are used as they are.
    """
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer

    source = Path(path) if path is not None else resolve_data_dir(data_dir) / WIKITEXT_FILE
    docs = wikitext_documents(load_text(source))[:limit]
    out = _write_if_changed(_cache_path(cache_dir, "wikitext-test", [source], limit), [{"page": d} for d in docs])
    return {
        "task": HARNESS_PREFIX + WIKITEXT,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"test": str(out)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": wikitext_detokenizer,
        "process_results": process_results,
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": {"version": 2.0, "harness_task": "wikitext", "source": str(source.resolve())},
    }


def build_configs(tasks: Sequence[str], data_dir: str | os.PathLike | None = None,
                  cache_dir: str | os.PathLike | None = None, limit: int | None = None,
                  split: str = "validation") -> list[dict[str, Any]]:
    """Config dicts for task names from ``EVAL_TASKS`` (``"wikitext"`` for perplexity)."""
    if isinstance(tasks, str):
        tasks = [tasks]
    unknown = [t for t in tasks if t not in EVAL_TASKS]
    if unknown:
        raise KeyError(f"unknown task(s) {unknown}; known: {', '.join(EVAL_TASKS)}")
    return [wikitext_config(data_dir, cache_dir, limit=limit) if t == WIKITEXT
            else task_config(t, split, data_dir, cache_dir, limit) for t in tasks]


# --------------------------------------------------------------------------- evaluate


def _offline() -> None:
    """Never let the harness or ``datasets`` reach for the hub."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _quiet_git_hash():
    """lm-eval records ``git describe`` of the working directory in its results (which gradot does
    not keep); outside a git checkout git's ``fatal: not a git repository`` went to the terminal."""
    import subprocess

    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL,
                                       text=True).strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def _flatten(task_results: dict[str, Any]) -> dict[str, float]:
    """``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` → ``{"acc": x, "acc_stderr": s}``."""
    out = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if filt == "none" and isinstance(value, (int, float)):
            out[metric] = float(value)
    return out


def harness_task_manager(include_path: str | os.PathLike | None = None):
    """The harness's own task registry (its 10k+ task yamls indexed: 10-40 s on 2 cores), plus the
    yamls under ``include_path`` (a user's own tasks); indexed once per process and folder."""
    return _task_manager(str(Path(include_path).resolve()) if include_path is not None else None)


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_harness_tasks(names: Sequence[str], include_path: str | os.PathLike | None = None, manager=None):
    """The harness's registry, after checking that it knows every name in ``names`` (tasks, groups
    or tags); a ``GradotError`` naming the unknown ones otherwise."""
    from ..errors import GradotError

    manager = manager or harness_task_manager(include_path)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise GradotError(f"unknown task(s) {unknown}: neither gradot's ({', '.join(EVAL_TASKS)}) nor "
                          "lm-evaluation-harness's (`lm-eval ls tasks` lists them; a task of your own: --include-path)")
    return manager


def evaluate(model, tokenizer, tasks: Sequence[str], data_dir: str | os.PathLike | None = None,
             limit: int | None = None, batch_size: int = 8, device: str | None = None,
             cache_dir: str | os.PathLike | None = None, max_length: int | None = None,
             split: str = "validation", bootstrap_iters: int = 1000, scorer: str = "fast",
             include_path: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """Zero-shot evaluation of an in-memory Hugging Face causal LM with lm-evaluation-harness.

    Args:
        model: a ``transformers.PreTrainedModel`` (e.g. an emulator with adapters plugged in).
        tokenizer: its tokenizer (a ``PreTrainedTokenizerFast``/``PreTrainedTokenizer``).
        tasks: names from ``EVAL_TASKS`` (``"wikitext"`` gives perplexity), read from the local
            files; any other name is a task (or group) of the harness's own registry, run as
            the harness runs it (its dataset downloaded through ``datasets``; its results under
            its own names, a group's subtasks included).
        data_dir: folder with the task files (see :func:`gradot.evaluation.tasks.resolve_data_dir`).
        limit: evaluate only the first ``limit`` examples (documents for wikitext) per task.
        batch_size: harness batch size (wikitext's rolling windows always go one at a time).
        device: when given, the model is MOVED there first (the harness runs a ready model
            where it lies).
        cache_dir: where the normalized JSONL files go (default :func:`default_cache_dir`).
        max_length: context length; the harness reads it from the model config when None.
        split: which split of the task files to score.
        bootstrap_iters: bootstrap resamples for the stderr of non-mean metrics
            (perplexities); accuracies get a closed-form stderr. 0 skips those stderrs.
        scorer: ``"fast"`` (:class:`gradot.evaluation.scorer.FastHFLM`: each context once, the head only
            on continuation tokens; ``batch_size`` counts contexts) or ``"stock"`` (the
            harness's ``HFLM``; ``batch_size`` counts requests). Same scores to float rounding.
        include_path: a folder of the user's own harness task yamls (for the harness's tasks).

    Returns:
        ``{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}}`` for multiple
        choice (race: acc only, as the harness), ``{"exact_match", "exact_match_stderr", "n"}``
        for webquestions, ``{"word_perplexity", "byte_perplexity", "bits_per_byte", "n"}`` for
        wikitext. ``n`` is the number of examples scored.
    """
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    harness = [t for t in tasks if t not in EVAL_TASKS]
    if not harness:
        _offline()
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gradot.evaluation.scorer import FastHFLM

    if scorer not in SCORERS:
        raise ValueError(f"scorer must be one of {', '.join(SCORERS)}, got {scorer!r}")
    lm_class = FastHFLM if scorer == "fast" else HFLM

    lm_eval.evaluator.get_git_commit_hash = _quiet_git_hash  # no stray "fatal:" line (see above)
    if device is not None:
        model = model.to(device)
    # Perplexity scores rolling windows as long as the context (8192 tokens for the default model):
    # at batch 8 their logits over a 49k vocabulary need ~25 GB, so one window at a time (the
    # harness's own default); the multiple-choice tasks keep ``batch_size``.
    groups = [([t for t in tasks if t != WIKITEXT and t not in harness], batch_size),
              ([t for t in tasks if t == WIKITEXT], 1)]
    results: dict[str, dict[str, float]] = {}
    if harness:  # the harness's own tasks, through its registry, downloading as it does
        manager = check_harness_tasks(harness, include_path)
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        out = lm_eval.simple_evaluate(model=lm, tasks=harness, limit=limit, bootstrap_iters=bootstrap_iters,
                                      log_samples=False, task_manager=manager)
        results.update({name: _flatten(row) | _count(out, name) for name, row in out["results"].items()})
    for group, group_batch in groups:
        if not group:
            continue
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=group_batch, max_length=max_length)
        # Our configs are self-contained; indexing the harness's own yamls costs ~10 s.
        out = lm_eval.simple_evaluate(model=lm, tasks=build_configs(group, data_dir, cache_dir, limit, split),
                                      limit=limit, bootstrap_iters=bootstrap_iters, log_samples=False,
                                      task_manager=TaskManager(include_defaults=False))
        results.update(_collect(out, group))
    ours = {t: results[t] for t in tasks if t not in harness}
    return {**ours, **{name: v for name, v in results.items() if name not in ours}}


def _count(out: dict[str, Any], key: str) -> dict[str, int]:
    n = out.get("n-samples", {}).get(key, {})
    return {"n": n["effective"]} if "effective" in n else {}


def _collect(out: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per-task metrics under our task names, plus the number of examples scored."""
    results = {}
    for name in tasks:
        key = HARNESS_PREFIX + name
        metrics = _flatten(out["results"][key])
        n = out.get("n-samples", {}).get(key, {})
        if "effective" in n:
            metrics["n"] = n["effective"]
        results[name] = metrics
    return results
