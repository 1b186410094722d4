"""Fine-tuning and calibration corpora from a user's own files.

Three formats:

* plain text (``.txt``, ``.raw``, anything else not JSON): :func:`load_text` returns the
  whole file as one string, e.g. WikiText-2 raw or tinyshakespeare for calibration or
  language-model fine-tuning;
* JSONL with a text field (``{"text": ...}`` per line): :func:`load_jsonl_texts` returns
  the strings;
* Alpaca-style instruction data (a JSON list, or JSONL, of
  ``{"instruction", "input", "output"}``): :func:`load_alpaca` returns
  :class:`InstructionExample` records whose ``prompt`` is the standard Stanford Alpaca
  template and whose ``continuation()`` is the output, so the loss goes on the output only,
  the same (prompt, continuation) shape as the task examples in :mod:`gradot.evaluation.tasks`.

:func:`load_corpus` picks the right loader from the file. Malformed data raises
:class:`gradot.evaluation.tasks.TaskDataError` naming the file, the line and the field.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Union

from gradot.evaluation.tasks import TaskDataError, iter_json_array, iter_jsonl

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "InstructionExample",
    "alpaca_prompt",
    "load_alpaca",
    "load_corpus",
    "load_jsonl_texts",
    "load_text",
]

# Stanford Alpaca's templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

_JSON_SUFFIXES = {".json", ".jsonl"}


@dataclass(frozen=True)
class InstructionExample:
    """An instruction-tuning record: train on ``continuation()`` given ``prompt``.

    The continuation is the bare output: the Alpaca prompt already ends in a newline, so no
    delimiter is added. Alpaca's trainer appends the tokenizer's EOS token after it; do that
    when tokenizing if the model should learn to stop.
    """

    prompt: str
    output: str

    @property
    def choices(self) -> tuple[str, ...]:
        return (self.output,)

    @property
    def golds(self) -> tuple[int, ...]:
        return (0,)

    def continuation(self, i: int | None = None) -> str:
        if i not in (None, 0):
            raise IndexError(f"an instruction example has one continuation, asked for {i}")
        return self.output


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt: the with-input template when ``input`` is non-empty (as Alpaca tests it)."""
    if input != "":
        return ALPACA_PROMPT.format(instruction=instruction, input=input)
    return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


def load_text(path: str | os.PathLike) -> str:
    """The whole file as UTF-8 text (calibration / perplexity text such as wiki.test.raw).

    Raises:
        FileNotFoundError: no such file.
        TaskDataError: the file is empty or holds only whitespace.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise TaskDataError(path, line, None, f"not valid UTF-8 text ({e.reason})") from None
    if not text.strip():
        raise TaskDataError(path, None, None, "the file is empty (no text to calibrate or train on)")
    return text


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line, object)`` pairs from a JSON list (``.json``) or JSONL file."""
    if path.suffix == ".json":
        return iter_json_array(path)
    return iter_jsonl(path)


def _string_field(row: Any, key: str, path: Path, line: int, required: bool = True) -> str:
    if not isinstance(row, dict):
        raise TaskDataError(path, line, None, f"expected a JSON object, got {type(row).__name__}")
    if key not in row:
        if required:
            raise TaskDataError(path, line, key, "missing")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise TaskDataError(path, line, key, f"expected str, got {type(value).__name__}")
    return value


def load_jsonl_texts(path: str | os.PathLike, field: str = "text", limit: int | None = None) -> list[str]:
    """The ``field`` string of each row of a JSONL file (or JSON list)."""
    path = Path(path)
    rows = islice(_records(path), limit)
    texts = [_string_field(row, field, path, line) for line, row in rows]
    if not texts:
        raise TaskDataError(path, None, None, "the file holds no rows")
    return texts


def load_alpaca(path: str | os.PathLike, limit: int | None = None) -> list[InstructionExample]:
    """Alpaca-style records (``instruction``, optional ``input``, ``output``) as prompt/output pairs."""
    path = Path(path)
    examples = []
    for line, row in islice(_records(path), limit):
        instruction = _string_field(row, "instruction", path, line)
        input_ = _string_field(row, "input", path, line, required=False)
        output = _string_field(row, "output", path, line)
        examples.append(InstructionExample(alpaca_prompt(instruction, input_), output))
    if not examples:
        raise TaskDataError(path, None, None, "the file holds no rows")
    return examples


Corpus = Union[str, list[str], list[InstructionExample]]


def _first_record(path: Path) -> tuple[int, Any]:
    for line, row in _records(path):
        return line, row
    raise TaskDataError(path, None, None, "the file holds no rows")


def load_corpus(path: str | os.PathLike, text_field: str = "text", limit: int | None = None) -> Corpus:
    """Load a corpus, choosing the format from the file.

    * ``.json`` / ``.jsonl`` whose first record has ``instruction`` → :func:`load_alpaca`;
    * other ``.json`` / ``.jsonl`` → :func:`load_jsonl_texts` with ``text_field``;
    * anything else (``.txt``, ``.raw``, ...) → :func:`load_text` (``limit`` does not apply).
    """
    path = Path(path)
    if path.suffix not in _JSON_SUFFIXES:
        return load_text(path)
    line, first = _first_record(path)
    if isinstance(first, dict) and "instruction" in first:
        return load_alpaca(path, limit)
    if isinstance(first, dict) and text_field not in first:  # neither format: say which ones are read
        fields = ", ".join(repr(k) for k in list(first)[:6]) or "none"
        raise TaskDataError(path, line, None,
                            f"rows have neither {text_field!r} (JSONL text) nor 'instruction' (+ 'input', "
                            f"'output': Alpaca-style) fields; found {fields}. Accepted: plain text, JSONL with "
                            f"{text_field!r}, or Alpaca-style instruction JSON/JSONL")
    return load_jsonl_texts(path, text_field, limit)
