"""Where task data comes from: a local folder, or the Hugging Face Hub datasets that
lm-evaluation-harness itself uses for the eight tasks, converted to the local layout.

The folder is found in this order: ``--data-dir`` (``data_dir``), ``$GRADOT_DATA_DIR``,
``../shared/data``, then the fetched copy under ``~/.cache/gradot/data`` (``$GRADOT_CACHE/data``;
:func:`gradot.evaluation.tasks.resolve_data_dir`). :func:`fetch_task_data` fills a folder from the Hub: each
task's dataset at a pinned revision (downloaded through ``huggingface_hub`` into its cache, so
``HF_HOME`` and ``HF_HUB_OFFLINE`` apply), its parquet files read with pyarrow, every row rewritten
in the files and formats of the original releases that :mod:`gradot.evaluation.tasks` reads (the same readers
and checks then apply), and the written files' SHA-256 recorded in ``fetched.json``. An offline
machine gets a copy of that folder (``--data-dir`` or ``$GRADOT_DATA_DIR``).

The split each local file holds: the Hub's ``train`` and ``validation`` splits (WebQuestions has no
validation split: its ``test`` split, which the harness scores, is the local ``validation``). The
shipped ``shared/data`` copy differs for three tasks (HellaSwag and SciQ re-split, WebQuestions'
validation cut from train: its README), so numbers from the two copies are not comparable.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import TaskDataUnavailableError
from .tasks import TASKS, data_cache_dir, resolve_data_dir

#: The text the default calibration and ``wikitext`` perplexity read, fetched with every task.
TEXT = "wikitext"
FETCHED_RECORD = "fetched.json"


# --------------------------------------------------------------------------- hub rows -> local rows


def _ai2_row(row: Mapping, stem_key: str) -> dict:
    """OpenBookQA/ARC on the Hub (``choices: {text: [...], label: [...]}``) in the AI2 release's
    JSONL form (``question: {stem, choices: [{text, label}]}``)."""
    choices = row["choices"]
    return {"id": row["id"],
            "question": {"stem": row[stem_key],
                         "choices": [{"text": t, "label": lab} for t, lab in zip(choices["text"], choices["label"], strict=True)]},
            "answerKey": row["answerKey"]}


def openbookqa_row(row: Mapping) -> dict:
    return _ai2_row(row, "question_stem")


def arc_row(row: Mapping) -> dict:
    return _ai2_row(row, "question")


def hellaswag_row(row: Mapping) -> dict:
    return {k: row[k] for k in ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id", "split",
                                "split_type", "label") if k in row}


def sciq_row(row: Mapping) -> dict:
    return {k: row[k] for k in ("question", "distractor3", "distractor1", "distractor2", "correct_answer", "support")}


def webquestions_row(row: Mapping) -> dict:
    return {"url": row["url"], "question": row["question"], "answers": list(row["answers"])}


def race_passages(rows: Iterable[Mapping]) -> list[dict]:
    """RACE on the Hub has one row per question; the release (and the harness's EleutherAI/race)
    one per passage: consecutive questions of the same passage (``example_id``) are joined."""
    passages: list[dict] = []
    for row in rows:
        if not passages or passages[-1]["example_id"] != row["example_id"]:
            passages.append({"example_id": row["example_id"], "article": row["article"], "questions": [],
                             "options": [], "answers": []})
        passage = passages[-1]
        passage["questions"].append(row["question"])
        passage["options"].append(list(row["options"]))
        passage["answers"].append(row["answer"])
    return passages


# --------------------------------------------------------------------------- local files


def _jsonl(rows: Iterable[Mapping]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _write_jsonl(convert: Callable[[Mapping], dict], names: Mapping[str, str] | None = None):
    names = names or {"train": "train.jsonl", "validation": "validation.jsonl"}

    def write(rows: Mapping[str, list[Mapping]]) -> dict[str, bytes]:
        return {names[split]: _jsonl(convert(r) for r in split_rows) for split, split_rows in rows.items()}
    return write


def _write_piqa(rows: Mapping[str, list[Mapping]]) -> dict[str, bytes]:
    """The PIQA release: ``X.jsonl`` without labels, ``X-labels.lst`` with one 0/1 a line."""
    out = {}
    for split, stem in (("train", "train"), ("validation", "valid")):
        out[f"{stem}.jsonl"] = _jsonl({k: r[k] for k in ("goal", "sol1", "sol2")} for r in rows[split])
        out[f"{stem}-labels.lst"] = "".join(f"{int(r['label'])}\n" for r in rows[split]).encode()
    return out


def _write_sciq(rows: Mapping[str, list[Mapping]]) -> dict[str, bytes]:
    return {f"{split}.json": json.dumps([sciq_row(r) for r in split_rows], ensure_ascii=False, indent=1).encode()
            for split, split_rows in rows.items()}


def _write_race(rows: Mapping[str, list[Mapping]]) -> dict[str, bytes]:
    return {f"{split}.jsonl.gz": gzip.compress(_jsonl(race_passages(split_rows)), mtime=0)
            for split, split_rows in rows.items()}


def _write_wikitext(rows: Mapping[str, list[Mapping]]) -> dict[str, bytes]:
    """WikiText on the Hub has one row per line of the raw file (each ending in its newline)."""
    names = {"validation": "wiki.valid.raw", "test": "wiki.test.raw"}
    return {names[split]: "".join(r["text"] for r in split_rows).encode() for split, split_rows in rows.items()}


# --------------------------------------------------------------------------- the sources


@dataclass(frozen=True)
class HubSource:
    """One task's dataset on the Hub, as lm-evaluation-harness loads it, and how it becomes files.

    Attributes:
        repo, revision: the dataset repository and the commit it is read at.
        config: the repository's sub-folder holding this task's parquet files (None: ``data/``).
        splits: local split -> the Hub split it is read from.
        write: rows per local split -> ``{file name: bytes}`` in the release's layout.
        folder: where the files go, relative to the data folder (default: the task's name).
    """

    repo: str
    revision: str
    config: str | None
    splits: Mapping[str, str]
    write: Callable[[Mapping[str, list[Mapping]]], dict[str, bytes]]
    folder: str | None = None


_TRAIN_VAL = {"train": "train", "validation": "validation"}
_ARC_REVISION = "210d026faf9955653af8916fad021475a3f00453"

#: The datasets of lm-evaluation-harness 0.4's task configs (``dataset_path``/``dataset_name``),
#: pinned; RACE's training questions come from ``ehovy/race`` (the harness's ``EleutherAI/race``
#: holds the test split only), WikiText's raw lines from ``Salesforce/wikitext``.
SOURCES: dict[str, HubSource] = {
    "openbookqa": HubSource("allenai/openbookqa", "388097ea7776314e93a529163e0fea805b8a6454", "main", _TRAIN_VAL,
                            _write_jsonl(openbookqa_row)),
    "piqa": HubSource("baber/piqa", "142f6d7367fd9877f0fb3b5734ea6a545f54cdd1", None, _TRAIN_VAL, _write_piqa),
    "arc_easy": HubSource("allenai/ai2_arc", _ARC_REVISION, "ARC-Easy", _TRAIN_VAL, _write_jsonl(arc_row)),
    "arc_challenge": HubSource("allenai/ai2_arc", _ARC_REVISION, "ARC-Challenge", _TRAIN_VAL, _write_jsonl(arc_row)),
    "hellaswag": HubSource("Rowan/hellaswag", "218ec52e09a7e7462a5400043bb9a69a41d06b76", None, _TRAIN_VAL,
                           _write_jsonl(hellaswag_row)),
    "sciq": HubSource("allenai/sciq", "2c94ad3e1aafab77146f384e23536f97a4849815", None, _TRAIN_VAL, _write_sciq),
    "webquestions": HubSource("stanfordnlp/web_questions", "0e473cbe21d1e91ec18da343644498be6a3f5454", None,
                              {"train": "train", "validation": "test"}, _write_jsonl(webquestions_row)),
    "race": HubSource("ehovy/race", "2fec9fd81f1dc971569a9b729c43f2f0e6436637", "high", _TRAIN_VAL, _write_race),
    TEXT: HubSource("Salesforce/wikitext", "b08601e04326c79dfdd32d625aee71d232d685c3", "wikitext-2-raw-v1",
                    {"validation": "validation", "test": "test"}, _write_wikitext, folder="text/wikitext-2-raw"),
}


def convert_rows(name: str, rows: Mapping[str, list[Mapping]]) -> dict[str, bytes]:
    """A task's Hub rows (per local split) as ``{file name: bytes}`` in the local layout."""
    return SOURCES[name].write(rows)


# --------------------------------------------------------------------------- fetching


def _split_files(snapshot: Path, source: HubSource, split: str) -> list[Path]:
    """The parquet files of one split in a dataset snapshot (``<config>/<split>-*.parquet`` and the
    other layouts the Hub writes)."""
    base = snapshot / (source.config or "data")
    for pattern in (f"{split}-*.parquet", f"{split}/*.parquet", f"{split}.parquet"):
        files = sorted(base.glob(pattern))
        if files:
            return files
    raise TaskDataUnavailableError(f"{source.repo}@{source.revision[:12]}: no parquet files for split '{split}' "
                                   f"under {base.relative_to(snapshot)}/")


def _download(source: HubSource) -> Path:
    """The dataset's snapshot folder in the Hugging Face cache (downloaded when missing)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source.repo, repo_type="dataset", revision=source.revision,
                                      allow_patterns=[f"{source.config or 'data'}/*"]))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        offline = "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache" if os.environ.get("HF_HUB_OFFLINE") \
            else f"no network? {type(exc).__name__}"
        raise TaskDataUnavailableError(
            f"cannot download {source.repo} from the Hugging Face Hub ({offline}): pass --data-dir DIR with the "
            "task files, or run `gradot data fetch` on a machine with network and copy its folder here") from None


def _read_rows(files: Sequence[Path]) -> list[dict]:
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for path in files:
        rows.extend(pq.read_table(path).to_pylist())
    return rows


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_record(to: Path) -> dict:
    path = to / FETCHED_RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def fetched_intact(to: Path, name: str) -> bool:
    """True when ``to`` holds ``name``'s fetched files at the pinned revision, unchanged."""
    entry = _read_record(to).get(name)
    source = SOURCES[name]
    if not entry or entry.get("revision") != source.revision or entry.get("repo") != source.repo:
        return False
    folder = to / (source.folder or name)
    return all((folder / f).is_file() and _sha256((folder / f).read_bytes()) == digest
               for f, digest in entry["sha256"].items())


def fetch_task_data(names: Sequence[str], to: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Download ``names`` (tasks, and ``"wikitext"``) from the Hub into ``to`` (default
    :func:`data_cache_dir`) in the local layout; a task already there intact is kept. Returns ``to``.

    Raises:
        TaskDataUnavailableError: no network (or ``HF_HUB_OFFLINE``) and not in the Hugging Face cache.
    """
    from tqdm.auto import tqdm

    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise TaskDataUnavailableError(f"no Hub source for {unknown}; known: {', '.join(SOURCES)}")
    to = Path(to).expanduser() if to is not None else data_cache_dir()
    to.mkdir(parents=True, exist_ok=True)
    for name in tqdm(list(dict.fromkeys(names)), desc="fetching task data", unit="task", disable=not progress):
        if fetched_intact(to, name):
            continue
        source = SOURCES[name]
        snapshot = _download(source)
        rows = {local: _read_rows(_split_files(snapshot, source, hub)) for local, hub in source.splits.items()}
        files = source.write(rows)
        folder = to / (source.folder or name)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for file_name, data in files.items():
            (tmp / file_name).write_bytes(data)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        record = _read_record(to)  # re-read: one record for every task fetched into this folder
        record[name] = {"repo": source.repo, "revision": source.revision, "config": source.config,
                        "splits": dict(source.splits), "sha256": {f: _sha256(d) for f, d in files.items()}}
        (to / FETCHED_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    return to


# --------------------------------------------------------------------------- before a run


def _found_root(data_dir) -> Path | None:
    try:
        return resolve_data_dir(data_dir)
    except FileNotFoundError:
        return None


def missing_files(names: Sequence[str], root: Path, splits: Sequence[str] = ("train", "validation")) -> list[Path]:
    """The files ``names`` need that the data folder ``root`` lacks."""
    missing = []
    for name in names:
        if name == TEXT:
            text = root / SOURCES[TEXT].folder
            missing += [p for p in (text / "wiki.valid.raw", text / "wiki.test.raw") if not p.is_file()]
            continue
        for split in splits:
            missing += [root / name / f for f in TASKS[name].files.get(split, ()) if not (root / name / f).is_file()]
    return missing


def require_task_data(names: Sequence[str], data_dir: str | os.PathLike | None = None,
                      splits: Sequence[str] = ("train", "validation"), fetch: bool = True) -> Path:
    """Check, before any model loads, that the data ``names`` need is there, and return its folder.
    When no local folder is found (or only the fetched cache, lacking some task), fetch what is
    missing from the Hub into the cache (``fetch``); a folder the user named is never replaced.

    Raises:
        TaskDataUnavailableError: one line naming both ways out (``--data-dir``, ``gradot data fetch``).
    """
    root = _found_root(data_dir)
    missing = missing_files(names, root, splits) if root is not None else None
    if missing == []:
        return root
    if root is not None and root != data_cache_dir().resolve():  # the user's folder, or the shared one
        shown = ", ".join(str(p) for p in missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise TaskDataUnavailableError(f"the data folder {root} lacks task files ({shown}): pass --data-dir DIR "
                                       "with them, or fetch them with `gradot data fetch --to DIR` and pass that")
    if not fetch:
        raise TaskDataUnavailableError("no task data found: pass --data-dir DIR (a folder laid out like shared/data), "
                                       "or run `gradot data fetch` (on a machine with network; copy its folder here)")
    return fetch_task_data(list(names))
