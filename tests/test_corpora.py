"""Corpora: plain text, JSONL text and Alpaca instruction data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradot.corpora import (
    ALPACA_PROMPT_NO_INPUT,
    InstructionExample,
    alpaca_prompt,
    load_alpaca,
    load_corpus,
    load_jsonl_texts,
    load_text,
)
from gradot.evaluation.tasks import TaskDataError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WIKI = DATA / "text" / "wikitext-2-raw" / "wiki.test.raw"
ALPACA = DATA / "instruct" / "alpaca_data_1k.json"


def test_load_text_reads_real_calibration_files():
    wiki = load_text(WIKI)
    assert wiki.startswith(" \n = Robert Boulter = \n")
    assert len(wiki) > 1_000_000
    shakespeare = load_text(DATA / "text" / "tinyshakespeare.txt")
    assert shakespeare.startswith("First Citizen:")


@pytest.mark.parametrize("content", ["", "  \n\n "])
def test_load_text_rejects_empty_files(tmp_path, content):
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(TaskDataError, match="empty") as info:
        load_text(path)
    assert info.value.path == path


def test_load_text_missing_and_binary(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "nope.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken")
    with pytest.raises(TaskDataError, match="UTF-8") as info:
        load_text(bad)
    assert info.value.line == 2


def test_alpaca_real_file_prompt_and_output():
    examples = load_alpaca(ALPACA)
    assert len(examples) == 1000
    first, second = examples[:2]
    # Row 1 has an empty input: the no-input template.
    assert first.prompt == ALPACA_PROMPT_NO_INPUT.format(
        instruction="Re-write the following sentence, making it more concise:\n \n"
                    "The two were walking together, and they were going to a nearby store.")
    assert first.continuation() == "They walked to a nearby store."
    assert second.prompt == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nRewrite the following sentence to use a passive voice instead.\n\n"
        "### Input:\nThe president delivered a speech yesterday.\n\n### Response:\n")
    assert second.continuation() == "A speech was delivered by the president yesterday."
    assert second.choices == (second.output,) and second.golds == (0,)


def test_alpaca_prompt_template_choice():
    assert "### Input:" not in alpaca_prompt("Do it.")
    assert alpaca_prompt("Do it.", "now").endswith("### Input:\nnow\n\n### Response:\n")


def test_alpaca_malformed_rows(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c"}\n]\n')
    with pytest.raises(TaskDataError) as info:
        load_alpaca(path)
    assert (info.value.path, info.value.line, info.value.field) == (path, 3, "output")
    assert f"{path}, line 3: field 'output'" in str(info.value)

    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text('{"instruction": "a", "input": 3, "output": "b"}\n')
    with pytest.raises(TaskDataError, match="'input'"):
        load_alpaca(jsonl)


def test_jsonl_texts(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert load_jsonl_texts(path) == ["one", "two"]
    assert load_jsonl_texts(path, limit=1) == ["one"]
    path.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    with pytest.raises(TaskDataError) as info:
        load_jsonl_texts(path)
    assert (info.value.line, info.value.field) == (2, "text")
    path.write_text("")
    with pytest.raises(TaskDataError, match="no rows"):
        load_jsonl_texts(path)


def test_load_corpus_dispatches_on_the_file(tmp_path):
    assert isinstance(load_corpus(WIKI), str)
    alpaca = load_corpus(ALPACA, limit=3)
    assert len(alpaca) == 3 and all(isinstance(e, InstructionExample) for e in alpaca)
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"content": "x"}\n')
    assert load_corpus(texts, text_field="content") == ["x"]
    raw = tmp_path / "notes.raw"
    raw.write_text("some text\n")
    assert load_corpus(raw) == "some text\n"
