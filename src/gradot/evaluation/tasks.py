"""Downstream task loaders that read the ORIGINAL release files.

Eight tasks of the offsite-tuning literature are supported (see ``TASKS``): openbookqa,
piqa, arc_easy, arc_challenge, hellaswag, sciq, webquestions and race. Each loader turns
the raw rows into examples whose prompt and answer strings are exactly what
lm-evaluation-harness 0.4.x feeds the model for the same task, so a model fine-tuned on
``example.prompt + example.continuation()`` sees at training time what it is scored on
at evaluation time.

Example types
-------------
* :class:`MCExample` (multiple choice, all tasks but webquestions): ``choices`` in the
  harness's order and the index ``gold`` of the correct one.
* :class:`GenExample` (webquestions): the gold ``answers`` as listed in the file. Its
  ``choices`` are the harness's scoring list (sorted, answers that extend another answer
  removed) and every choice is gold (``golds``); it is scored by exact match, i.e. whether
  greedy decoding reproduces any of them.

Both expose ``prompt``, ``choices``, ``golds`` and ``continuation(i)``; the continuation is
the target delimiter ``" "`` followed by the choice, as the harness appends it to the
prompt, so a fine-tuner can put the loss on those tokens only.

Data folder
-----------
``data_dir`` may be any folder laid out like ``shared/data`` (one sub-folder per task,
original file names). When it is not given, ``$GRADOT_DATA_DIR`` is used, then
``../shared/data`` relative to the working directory, then the ``shared/data`` folder
beside this repository, then the copy ``gradot data fetch`` writes (``~/.cache/gradot/data``;
:mod:`gradot.evaluation.task_data`).

Malformed data raises :class:`TaskDataError` naming the file, the line and the field;
no row is ever skipped silently.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from itertools import islice
from pathlib import Path
from typing import Any, Union
from ..errors import TaskDataError, TaskDataUnavailableError  # noqa: F401  (re-exported)

__all__ = [
    "TARGET_DELIMITER",
    "TASKS",
    "TASK_NAMES",
    "Example",
    "GenExample",
    "MCExample",
    "TaskDataError",
    "TaskSpec",
    "arc_prompt",
    "hellaswag_preprocess",
    "hellaswag_prompt",
    "iter_json_array",
    "iter_jsonl",
    "iter_task",
    "load_task",
    "openbookqa_prompt",
    "piqa_prompt",
    "race_prompt",
    "resolve_data_dir",
    "sciq_prompt",
    "task_files",
    "webqs_choices",
    "webqs_prompt",
]

#: The harness joins prompt and answer with this string (``target_delimiter``).
TARGET_DELIMITER = " "

DATA_DIR_ENV = "GRADOT_DATA_DIR"


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class _Loc:
    """Where a row came from, for error messages."""

    path: Path
    line: int

    def error(self, field: str | None, problem: str) -> TaskDataError:
        return TaskDataError(self.path, self.line, field, problem)


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class MCExample:
    """A multiple-choice example scored by the log-likelihood of each continuation."""

    context: str
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "choices", tuple(self.choices))
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold {self.gold} out of range for {len(self.choices)} choices")

    @property
    def prompt(self) -> str:
        """The text the model is conditioned on (the harness's ``doc_to_text``)."""
        return self.context

    @property
    def golds(self) -> tuple[int, ...]:
        """Indices of the correct choices (one for multiple choice)."""
        return (self.gold,)

    def continuation(self, i: int | None = None) -> str:
        """``" " + choices[i]``; ``i=None`` gives the gold answer (the fine-tuning target)."""
        return TARGET_DELIMITER + self.choices[self.gold if i is None else i]


@dataclass(frozen=True)
class GenExample:
    """A generative example (webquestions) with several acceptable answers.

    ``answers`` keeps the file's order; ``continuation()`` (no index) is the first of them,
    the fine-tuning target. ``choices`` is the list the harness scores (see
    :func:`webqs_choices`), all of them gold.
    """

    context: str
    answers: tuple[str, ...]
    choices: tuple[str, ...] = dataclass_field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "answers", tuple(self.answers))
        if not self.answers:
            raise ValueError("a generative example needs at least one answer")
        object.__setattr__(self, "choices", tuple(webqs_choices(self.answers)))

    @property
    def prompt(self) -> str:
        return self.context

    @property
    def golds(self) -> tuple[int, ...]:
        return tuple(range(len(self.choices)))

    def continuation(self, i: int | None = None) -> str:
        """``" " + choices[i]``; ``i=None`` gives ``" " + answers[0]`` (the fine-tuning target)."""
        return TARGET_DELIMITER + (self.answers[0] if i is None else self.choices[i])


Example = Union[MCExample, GenExample]


# --------------------------------------------------------------------------- prompts
# Each mirrors the harness's yaml/utils for the task (lm_eval/tasks/<task>/); the tests
# compare them against the harness's own rendering.


def openbookqa_prompt(stem: str) -> str:
    """openbookqa.yaml: ``doc_to_text: question_stem``."""
    return stem


def arc_prompt(question: str) -> str:
    """arc_easy.yaml / arc_challenge.yaml."""
    return f"Question: {question}\nAnswer:"


def piqa_prompt(goal: str) -> str:
    """piqa.yaml."""
    return f"Question: {goal}\nAnswer:"


def hellaswag_preprocess(text: str) -> str:
    """hellaswag/utils.py ``preprocess``: drop WikiHow bracket markers like ``[title]``."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_prompt(activity_label: str, ctx_a: str, ctx_b: str) -> str:
    """hellaswag/utils.py ``process_docs`` (the ``query`` field)."""
    return hellaswag_preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())


def sciq_prompt(support: str, question: str) -> str:
    """sciq.yaml: ``{{support.lstrip()}}\\nQuestion: {{question}}\\nAnswer:``."""
    return f"{support.lstrip()}\nQuestion: {question}\nAnswer:"


def webqs_prompt(question: str) -> str:
    """webqs.yaml."""
    return f"Question: {question}\nAnswer:"


def webqs_choices(answers: Iterable[str]) -> list[str]:
    """webqs/utils.py ``_remove_prefixes``: sort, then drop answers extending a kept one.

    Dropping them loses nothing: greedy decoding that reproduces an answer also reproduces
    each of its prefixes.
    """
    aliases = sorted(answers)
    kept = [aliases[0]]
    for alias in aliases[1:]:
        if not alias.startswith(kept[-1]):
            kept.append(alias)
    return kept


def race_prompt(article: str, solved: Sequence[tuple[str, str]], question: str) -> str:
    """race/preprocess_race.py ``doc_to_text``.

    ``solved`` holds the (question, answer text) pairs that come before ``question`` in the
    passage; the harness shows them, answered, between the article and the question.
    Fill-in-the-blank questions ending in ``"  _  ."`` get the answer spliced in.
    """
    text = "Article: " + article + "\n\n"
    for q, answer in solved:
        if q[-6:] == "  _  .":
            text += q[:-5] + answer + "\n"
        else:
            text += "Question: " + q + "\n" + "Answer: " + answer + "\n"
    return text + question


# --------------------------------------------------------------------------- file readers


def _open_text(path: Path):
    """Open a UTF-8 text file, transparently gunzipping ``*.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _check_exists(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, parsed_object)`` for each line of a (optionally gzipped) JSONL file.

    Blank lines are allowed only at the end of the file: a blank line inside it usually
    means a broken export and, for PIQA, would shift every label after it.
    """
    path = Path(path)
    _check_exists(path)
    blank_at = None
    with _open_text(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                blank_at = blank_at or line_no
                continue
            if blank_at is not None:
                raise TaskDataError(path, blank_at, None, "empty line inside the file")
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(path, line_no, None, f"invalid JSON ({e.msg})") from None


def iter_json_array(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """Yield ``(line_number, item)`` for each item of a JSON file holding one top-level list.

    The line number is the line on which the item starts, so errors point into the file.
    """
    path = Path(path)
    _check_exists(path)
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")

    counted = [0, 1]  # (position, its line): items come in order, so count only the new stretch

    def line_of(pos: int) -> int:
        start, line = counted
        line += text.count("\n", start, pos) if pos >= start else -text.count("\n", pos, start)
        counted[:] = [pos, line]
        return line

    pos = ws.match(text, 0).end()
    if pos == len(text) or text[pos] != "[":
        raise TaskDataError(path, line_of(pos), None, "expected a JSON list of objects")
    pos = ws.match(text, pos + 1).end()
    if not text.startswith("]", pos):  # a non-empty list: items separated by commas
        while True:
            try:
                item, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise TaskDataError(path, e.lineno, None, f"invalid JSON ({e.msg})") from None
            yield line_of(pos), item
            pos = ws.match(text, end).end()
            if text.startswith("]", pos):
                break
            if not text.startswith(",", pos):
                raise TaskDataError(path, line_of(pos), None, "invalid JSON (expected ',' or ']')")
            pos = ws.match(text, pos + 1).end()
    # `pos` is at the closing bracket: nothing but whitespace may follow it.
    extra = ws.match(text, pos + 1).end()
    if extra != len(text):
        raise TaskDataError(path, line_of(extra), None, "invalid JSON (extra data after the list)")


def _rows(reader: Callable[[Path], Iterator[tuple[int, Any]]], path: Path) -> Iterator[tuple[_Loc, dict]]:
    """Attach a location to each row and insist that rows are JSON objects."""
    for line_no, row in reader(path):
        loc = _Loc(path, line_no)
        if not isinstance(row, dict):
            raise loc.error(None, f"expected a JSON object, got {type(row).__name__}")
        yield loc, row


def _read_jsonl(paths: Sequence[Path]) -> Iterator[tuple[_Loc, dict]]:
    return _rows(iter_jsonl, paths[0])


def _read_json_array(paths: Sequence[Path]) -> Iterator[tuple[_Loc, dict]]:
    return _rows(iter_json_array, paths[0])


def _read_piqa(paths: Sequence[Path]) -> Iterator[tuple[_Loc, dict]]:
    """PIQA: rows from ``X.jsonl``, the label (0/1) from the same line of ``X-labels.lst``."""
    rows_path, labels_path = paths
    _check_exists(labels_path)
    with open(labels_path, encoding="utf-8") as labels:
        n = 0
        for n, (loc, row) in enumerate(_rows(iter_jsonl, rows_path), start=1):
            raw = labels.readline()
            if not raw:
                raise TaskDataError(labels_path, n, "label",
                                    f"missing: {rows_path.name} has more rows than labels")
            if raw.strip() not in ("0", "1"):
                raise TaskDataError(labels_path, n, "label", f"expected 0 or 1, got {raw.strip()!r}")
            yield loc, {**row, "label": int(raw)}
        rest = labels.read()
        if rest.strip():
            raise TaskDataError(labels_path, n + 1, "label",
                                f"extra label: {rows_path.name} has only {n} rows")


# --------------------------------------------------------------------------- field access


def _get(row: Mapping, key: str, loc: _Loc, kind: type | tuple[type, ...] = str, name: str | None = None) -> Any:
    """``row[key]`` checked to be of ``kind``; otherwise a TaskDataError naming ``name or key``."""
    name = name or key
    if key not in row:
        raise loc.error(name, "missing")
    value = row[key]
    # bool is an int subclass; a label of `true` is still a malformed label.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        want = " or ".join(t.__name__ for t in _as_tuple(kind))
        raise loc.error(name, f"expected {want}, got {type(value).__name__}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _str_list(row: Mapping, key: str, loc: _Loc, name: str | None = None, min_len: int = 1) -> list[str]:
    """A list of strings with at least ``min_len`` items."""
    name = name or key
    values = _get(row, key, loc, list, name)
    if len(values) < min_len:
        raise loc.error(name, f"expected at least {min_len} item(s), got {len(values)}")
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise loc.error(f"{name}[{i}]", f"expected str, got {type(v).__name__}")
    return values


def _index_label(value: Any, n: int, loc: _Loc, name: str) -> int:
    """An integer label (int or digit string, as in HF exports) in ``range(n)``."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]+", value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
        raise loc.error(name, f"expected an index in 0..{n - 1}, got {value!r}")
    return value


# --------------------------------------------------------------------------- row converters


def _ai2_choices(row: dict, loc: _Loc) -> tuple[str, list[str], list[str]]:
    """OpenBookQA/ARC layout: ``question.stem`` and ``question.choices[{text,label}]``."""
    question = _get(row, "question", loc, dict)
    stem = _get(question, "stem", loc, str, "question.stem")
    choices = _get(question, "choices", loc, list, "question.choices")
    if len(choices) < 2:
        raise loc.error("question.choices", f"expected at least 2 choices, got {len(choices)}")
    texts, labels = [], []
    for i, choice in enumerate(choices):
        name = f"question.choices[{i}]"
        if not isinstance(choice, dict):
            raise loc.error(name, f"expected an object, got {type(choice).__name__}")
        texts.append(_get(choice, "text", loc, str, f"{name}.text"))
        labels.append(_get(choice, "label", loc, str, f"{name}.label"))
    return stem, texts, labels


def _gold_from_key(key: str, labels: list[str], loc: _Loc) -> int:
    if key not in labels:
        raise loc.error("answerKey", f"{key!r} is not one of the choice labels {labels}")
    return labels.index(key)


def _openbookqa(row: dict, loc: _Loc) -> Iterator[Example]:
    stem, texts, labels = _ai2_choices(row, loc)
    # The harness strips leading blanks from the key (some OBQA keys carry one).
    key = _get(row, "answerKey", loc).lstrip()
    yield MCExample(openbookqa_prompt(stem), texts, _gold_from_key(key, labels, loc))


def _arc(row: dict, loc: _Loc) -> Iterator[Example]:
    # Labels are "A".."E" or, for some ARC rows, "1".."5"; the key uses the same scheme.
    stem, texts, labels = _ai2_choices(row, loc)
    key = _get(row, "answerKey", loc)
    yield MCExample(arc_prompt(stem), texts, _gold_from_key(key, labels, loc))


def _piqa(row: dict, loc: _Loc) -> Iterator[Example]:
    # `label` was merged in (and checked) by _read_piqa from the aligned .lst line.
    goal = _get(row, "goal", loc)
    sols = [_get(row, "sol1", loc), _get(row, "sol2", loc)]
    yield MCExample(piqa_prompt(goal), sols, row["label"])


def _hellaswag(row: dict, loc: _Loc) -> Iterator[Example]:
    query = hellaswag_prompt(_get(row, "activity_label", loc), _get(row, "ctx_a", loc), _get(row, "ctx_b", loc))
    endings = _str_list(row, "endings", loc, min_len=2)
    gold = _index_label(_get(row, "label", loc, (int, str)), len(endings), loc, "label")
    yield MCExample(query, [hellaswag_preprocess(e) for e in endings], gold)


def _sciq(row: dict, loc: _Loc) -> Iterator[Example]:
    choices = [_get(row, k, loc) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
    prompt = sciq_prompt(_get(row, "support", loc), _get(row, "question", loc))
    yield MCExample(prompt, choices, 3)  # the harness always puts the correct answer last


def _webquestions(row: dict, loc: _Loc) -> Iterator[Example]:
    question = _get(row, "question", loc)
    yield GenExample(webqs_prompt(question), _str_list(row, "answers", loc))


_RACE_LETTERS = ("A", "B", "C", "D")


def _race(row: dict, loc: _Loc) -> Iterator[Example]:
    """One passage row → one example per question (each prompt shows the earlier ones solved).

    A passage may have no questions (two RACE-high training passages have none); it then
    yields nothing, which is what the data says rather than a skipped row.
    """
    article = _get(row, "article", loc)
    questions = _str_list(row, "questions", loc, min_len=0)
    options = _get(row, "options", loc, list)
    answers = _str_list(row, "answers", loc, min_len=0)
    for name, values in (("options", options), ("answers", answers)):
        if len(values) != len(questions):
            raise loc.error(name, f"has {len(values)} items for {len(questions)} questions")
    solved: list[tuple[str, str]] = []
    for k, question in enumerate(questions):
        opts = _str_list({"o": options[k]}, "o", loc, f"options[{k}]", min_len=4)
        if len(opts) != 4:
            raise loc.error(f"options[{k}]", f"expected 4 options, got {len(opts)}")
        if answers[k] not in _RACE_LETTERS:
            raise loc.error(f"answers[{k}]", f"expected one of A, B, C, D, got {answers[k]!r}")
        gold = _RACE_LETTERS.index(answers[k])
        yield MCExample(race_prompt(article, solved, question), opts, gold)
        solved.append((question, opts[gold]))


def _race_last(row: dict, loc: _Loc) -> Iterator[Example]:
    """Evaluation: the harness makes one doc per passage and scores its last question only."""
    yield from list(_race(row, loc))[-1:]  # every question is still checked


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class TaskSpec:
    """How to read one task.

    Attributes:
        name: registry key.
        files: split → file names inside ``<data_dir>/<name>/`` (PIQA has two per split).
        reader: file paths → ``(location, row)`` pairs.
        convert: one row → its examples (RACE yields several per passage).
        eval_convert: the conversion for the validation split when the harness scores fewer
            examples per row than training can use (RACE: the last question of each passage).
        metrics: what the harness reports for the task.
        output_type: ``multiple_choice`` for every task (webquestions too: the harness
            scores its exact match by greedy checks on the gold continuations).
        harness_task: the task's name in lm-evaluation-harness.
    """

    name: str
    files: Mapping[str, tuple[str, ...]]
    reader: Callable[[Sequence[Path]], Iterator[tuple[_Loc, dict]]]
    convert: Callable[[dict, _Loc], Iterator[Example]]
    metrics: tuple[str, ...]
    harness_task: str
    output_type: str = "multiple_choice"
    eval_convert: Callable[[dict, _Loc], Iterator[Example]] | None = None

    def converter(self, split: str) -> Callable[[dict, _Loc], Iterator[Example]]:
        return self.eval_convert if split == "validation" and self.eval_convert else self.convert

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)


_ACC = ("acc", "acc_norm")


def _jsonl_files(train: str = "train.jsonl", validation: str = "validation.jsonl") -> dict[str, tuple[str, ...]]:
    return {"train": (train,), "validation": (validation,)}


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("openbookqa", _jsonl_files(), _read_jsonl, _openbookqa, _ACC, "openbookqa"),
        TaskSpec("piqa", {"train": ("train.jsonl", "train-labels.lst"),
                          "validation": ("valid.jsonl", "valid-labels.lst")},
                 _read_piqa, _piqa, _ACC, "piqa"),
        TaskSpec("arc_easy", _jsonl_files(), _read_jsonl, _arc, _ACC, "arc_easy"),
        TaskSpec("arc_challenge", _jsonl_files(), _read_jsonl, _arc, _ACC, "arc_challenge"),
        TaskSpec("hellaswag", _jsonl_files(), _read_jsonl, _hellaswag, _ACC, "hellaswag"),
        TaskSpec("sciq", _jsonl_files("train.json", "validation.json"), _read_json_array, _sciq, _ACC, "sciq"),
        TaskSpec("webquestions", _jsonl_files(), _read_jsonl, _webquestions, ("exact_match",), "webqs"),
        # The harness's race task reports acc only.
        TaskSpec("race", _jsonl_files("train.jsonl.gz", "validation.jsonl.gz"), _read_jsonl, _race, ("acc",), "race",
                 eval_convert=_race_last),
    )
}

TASK_NAMES: tuple[str, ...] = tuple(TASKS)


# --------------------------------------------------------------------------- public API


def data_cache_dir() -> Path:
    """Where ``gradot data fetch`` writes by default (:mod:`gradot.evaluation.task_data`), the search's last stop:
    ``$GRADOT_CACHE/data`` or ``~/.cache/gradot/data``."""
    return Path(os.environ.get("GRADOT_CACHE", Path.home() / ".cache" / "gradot")).expanduser() / "data"


def repository_data_dir() -> Path:
    """``shared/data`` beside this repository (``src/gradot`` → ``../../../shared/data``)."""
    return Path(__file__).resolve().parents[4] / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the task sub-folders.

    Order: the argument, ``$GRADOT_DATA_DIR``, ``../shared/data`` from the working directory,
    then ``shared/data`` beside this repository (``src/gradot`` → ``../../../shared/data``), then
    the fetched copy (:func:`gradot.evaluation.task_data.data_cache_dir`).
    """
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise TaskDataUnavailableError(f"data folder not found: {path} (--data-dir)")
        return path.resolve()
    candidates = []
    if os.environ.get(DATA_DIR_ENV):
        candidates.append(Path(os.environ[DATA_DIR_ENV]).expanduser())
    candidates += [Path.cwd() / ".." / "shared" / "data", repository_data_dir(),
                   data_cache_dir()]  # filled by `gradot data fetch`
    for path in candidates:
        if path.is_dir():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise TaskDataUnavailableError(
        f"no task data found (tried {tried}): pass --data-dir DIR (or set ${DATA_DIR_ENV}), or run "
        "`gradot data fetch` (on a machine with network; copy its folder here)")


def _spec(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(TASK_NAMES)}") from None


def task_files(name: str, split: str = "validation", data_dir: str | os.PathLike | None = None) -> tuple[Path, ...]:
    """Absolute paths of the files a task's split is read from."""
    spec = _spec(name)
    if split not in spec.files:
        raise ValueError(f"task {name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    folder = resolve_data_dir(data_dir) / name
    return tuple(folder / f for f in spec.files[split])


def iter_task(name: str, split: str = "validation", data_dir: str | os.PathLike | None = None) -> Iterator[Example]:
    """Lazily yield a task's examples in file order."""
    spec = _spec(name)
    convert = spec.converter(split)
    for loc, row in spec.reader(task_files(name, split, data_dir)):
        yield from convert(row, loc)


def load_task(name: str, split: str = "validation", data_dir: str | os.PathLike | None = None,
              limit: int | None = None) -> list[Example]:
    """Read a task's split into a list of examples (the first ``limit`` when given).

    Args:
        name: one of ``TASK_NAMES``.
        split: ``"train"`` or ``"validation"``.
        data_dir: folder with one sub-folder per task; see :func:`resolve_data_dir`.
        limit: stop after this many examples (RACE training: questions, not passages).

    Raises:
        TaskDataError: a row is malformed (names file, line and field).
        FileNotFoundError: the folder or a file is missing.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return list(islice(iter_task(name, split, data_dir), limit))
