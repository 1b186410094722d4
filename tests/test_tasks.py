"""Task loaders: real files parse, gold answers match the files, prompts match the harness."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradot.evaluation.tasks import (  # noqa: E402
    TASK_NAMES,
    TASKS,
    GenExample,
    MCExample,
    TaskDataError,
    iter_json_array,
    load_task,
    resolve_data_dir,
    task_files,
    webqs_choices,
)

# The task data always sits beside the repository: <repo>/../shared/data.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- real files


def test_registry_lists_the_eight_tasks():
    assert set(TASK_NAMES) == {"openbookqa", "piqa", "arc_easy", "arc_challenge", "hellaswag",
                               "sciq", "webquestions", "race"}
    for spec in TASKS.values():
        assert spec.splits == ("train", "validation")
    assert TASKS["webquestions"].metrics == ("exact_match",)
    assert TASKS["race"].metrics == ("acc",)
    assert TASKS["arc_easy"].metrics == ("acc", "acc_norm")


@pytest.mark.parametrize("name", TASK_NAMES)
@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_loader_parses_its_real_files(name, split):
    examples = load_task(name, split, DATA, limit=5)
    assert len(examples) == 5
    for ex in examples:
        assert ex.prompt and ex.choices
        assert all(0 <= g < len(ex.choices) for g in ex.golds)
        assert ex.continuation().startswith(" ")


# Gold answers read by hand from the files (first rows unless noted).
KNOWN = [
    ("openbookqa", 0, "Frilled sharks and angler fish live far beneath the surface of the ocean, "
                      "which is why they are known as", "Deep sea animals"),
    ("openbookqa", 1, "Gas can fill any container it is given, and liquid", "uses what it needs"),
    ("arc_easy", 0, "Question: Which technology was developed most recently?\nAnswer:", "cellular telephone"),
    ("arc_easy", 1, None, "Do algae use sunlight to make food?"),
    # line 90: labels "1".."4", answerKey "2"
    ("arc_challenge", 89, None, "equal to the total mass of the products"),
    # line 211: five choices, answerKey "E"
    ("arc_challenge", 210, "Question: Which of the following organs is NOT situated in the abdomen?\nAnswer:", "heart"),
    ("piqa", 0, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
     "Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, "
     "you will also need to supply it with a water bottle and a food dish."),
    ("piqa", 1, "Question: dresser\nAnswer:", "finish, woodgrain with  bobby pin "),
    ("hellaswag", 0, "High jump: A boy is running down a track. The boy",
     "lifts his body above the height of a pole."),
    ("hellaswag", 1, None, "takes a small stone from the flowing river and smashes it on another stone."),
    ("sciq", 0, None, "oxidants"),
    ("sciq", 35, "\nQuestion: In what type of animals may a body cavity be present or absent?\nAnswer:",
     "triploblastic"),
    # race validation: one doc per passage, its last question (passage 1 has 3, passage 2 has 5)
    ("race", 0, None, "were worried that trusts might manipulate the government"),
    ("race", 1, None, "Bargaining is disappearing with the development of society."),
]


@pytest.mark.parametrize("name,index,prompt,answer", KNOWN)
def test_known_rows_have_the_right_gold_answer(name, index, prompt, answer):
    ex = load_task(name, "validation", DATA, limit=index + 1)[index]
    assert isinstance(ex, MCExample)
    assert ex.choices[ex.gold] == answer
    assert ex.continuation() == " " + answer
    if prompt is not None:
        assert ex.prompt == prompt


def test_webquestions_keeps_all_answers():
    ex = load_task("webquestions", "validation", DATA, limit=1)[0]
    assert isinstance(ex, GenExample)
    assert ex.prompt == "Question: what was the name of william shakespeare's children?\nAnswer:"
    assert ex.answers == ("Judith Quiney", "Susanna Hall", "Hamnet Shakespeare")
    assert ex.choices == ("Hamnet Shakespeare", "Judith Quiney", "Susanna Hall")
    assert ex.golds == (0, 1, 2)
    assert ex.continuation() == " Judith Quiney"  # training target: first answer in the file
    assert ex.continuation(2) == " Susanna Hall"


def test_webqs_choices_drops_extensions_of_kept_answers():
    assert webqs_choices(["New York City", "New York", "Albany"]) == ["Albany", "New York"]


def _first_race_passage():
    loc, row = next(TASKS["race"].reader(task_files("race", "validation", DATA)))
    return loc, row


def test_race_trains_on_every_question_with_earlier_ones_solved():
    loc, row = _first_race_passage()
    examples = list(TASKS["race"].convert(row, loc))
    assert len(examples) == len(row["questions"]) >= 3
    first, second, third = examples[:3]
    assert first.prompt.startswith("Article: One thinks of princes and presidents")
    assert first.prompt.endswith("\n\nThe Sherman Antitrust Act  _  .")
    # Fill-in-the-blank question 1 is shown with its answer spliced in.
    assert ("\n\nThe Sherman Antitrust Act sought to eliminate monopolies in favor of competition "
            "in the market-place\nOne might infer from this passage that lower prices   _  .") in second.prompt
    assert second.prompt.endswith("lower prices   _  .")
    assert third.prompt.startswith(second.prompt.rsplit("\n", 1)[0])


def test_race_evaluates_the_last_question_of_each_passage_as_the_harness():
    loc, row = _first_race_passage()
    every = list(TASKS["race"].convert(row, loc))
    (first_doc,) = load_task("race", "validation", DATA, limit=1)
    assert first_doc.prompt == every[-1].prompt and first_doc.gold == every[-1].gold


def test_full_split_sizes_match_the_readme():
    # Fast splits only (the README's row counts; race counts passages, we count questions).
    assert len(load_task("arc_challenge", "validation", DATA)) == 299
    assert len(load_task("openbookqa", "validation", DATA)) == 500
    assert len(load_task("piqa", "validation", DATA)) == 1838
    assert len(load_task("sciq", "validation", DATA)) == 500


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADOT_DATA_DIR", str(DATA))
    assert resolve_data_dir() == DATA.resolve()
    assert task_files("piqa", "train") == (DATA.resolve() / "piqa" / "train.jsonl",
                                           DATA.resolve() / "piqa" / "train-labels.lst")
    monkeypatch.delenv("GRADOT_DATA_DIR")
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the repo root
    assert resolve_data_dir() == DATA.resolve()
    with pytest.raises(FileNotFoundError):
        resolve_data_dir(tmp_path / "nope")


def test_unknown_task_or_split():
    with pytest.raises(KeyError, match="known"):
        load_task("mmlu", "validation", DATA)
    with pytest.raises(ValueError, match="splits"):
        load_task("piqa", "test", DATA)


# --------------------------------------------------------------------------- harness parity


def _hf_docs(name: str, rows: list[dict]) -> list[dict]:
    """Our file rows rewritten in the schema of the harness's hub dataset for the task."""
    def ai2(row, stem_key):
        q = row["question"]
        return {"id": row["id"], stem_key: q["stem"], "answerKey": row["answerKey"],
                "choices": {"text": [c["text"] for c in q["choices"]], "label": [c["label"] for c in q["choices"]]}}

    if name == "openbookqa":
        return [ai2(r, "question_stem") for r in rows]
    if name.startswith("arc_"):
        return [ai2(r, "question") for r in rows]
    if name == "hellaswag":
        return [{**r, "label": str(r["label"])} for r in rows]  # the hub stores labels as strings
    if name == "race":
        # EleutherAI/race: `problems` is a Python-literal list; the harness scores the last one.
        docs = []
        for r in rows:
            problems = [{"answer": a, "options": o, "question": q}
                        for q, o, a in zip(r["questions"], r["options"], r["answers"])]
            docs.append({"article": r["article"], "problems": repr(problems)})
        return docs
    return rows


def _raw_rows(name: str, n: int) -> list[dict]:
    """The first n rows of the validation file (PIQA gets its label merged in)."""
    path = task_files(name, "validation", DATA)[0]
    if name == "sciq":
        return [row for _, row in zip(range(n), (r for _, r in iter_json_array(path)))]
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    if name == "piqa":
        labels = task_files(name, "validation", DATA)[1].read_text().split()
        rows = [{**r, "label": int(lab)} for r, lab in zip(rows, labels)]
    return rows


def _harness_render(name: str, docs: list[dict], tmp_path: Path) -> list[tuple]:
    """(text, choices, target) for each doc, rendered by the harness's own yaml for the task.

    The yaml is loaded as shipped (jinja templates, !function utils) and only its dataset
    is pointed at a local JSONL holding the docs.
    """
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    harness = TASKS[name].harness_task
    folder = "arc" if harness.startswith("arc_") else harness
    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / folder / f"{harness}.yaml")
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    cfg.pop("tag", None)
    cfg.update(dataset_path="json", dataset_name=None, training_split=None, validation_split=None,
               test_split="test", dataset_kwargs={"data_files": {"test": str(data)},
                                                  "cache_dir": str(tmp_path / "hf")})
    task = ConfigurableTask(config=cfg)
    return [(task.doc_to_text(d), task.doc_to_choice(d), task.doc_to_target(d)) for d in task.eval_docs]


# Rows worth checking beyond the first few: brackets (hellaswag), empty support (sciq),
# numeric labels and five choices (arc_challenge).
PARITY_ROWS = {"hellaswag": 660, "sciq": 40, "arc_challenge": 211, "race": 2, "webquestions": 10}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_prompts_and_choices_equal_the_harness(name, tmp_path):
    docs = _hf_docs(name, _raw_rows(name, PARITY_ROWS.get(name, 6)))
    ours = load_task(name, "validation", DATA, limit=len(docs))
    theirs = _harness_render(name, docs, tmp_path)
    assert len(theirs) == len(docs) == len(ours)
    for ex, (text, choices, target) in zip(ours, theirs):
        assert ex.prompt == text
        assert list(ex.choices) == list(choices)
        assert (list(ex.golds) if isinstance(ex, GenExample) else ex.gold) == target


# --------------------------------------------------------------------------- malformed rows


def _obqa(stem=True, key="A"):
    q = {"choices": [{"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}
    if stem:
        q["stem"] = "s"
    return json.dumps({"id": "1", "question": q, "answerKey": key})


GOOD_RACE = {"article": "a", "questions": ["q?"], "options": [["1", "2", "3", "4"]], "answers": ["A"]}

MALFORMED = [
    # (task, {file: content}, bad file, line, field)
    ("openbookqa", {"validation.jsonl": _obqa() + "\n" + _obqa(stem=False) + "\n"},
     "validation.jsonl", 2, "question.stem"),
    ("arc_easy", {"validation.jsonl": _obqa(key="C") + "\n"}, "validation.jsonl", 1, "answerKey"),
    ("arc_challenge", {"validation.jsonl": _obqa() + "\n{not json\n"}, "validation.jsonl", 2, None),
    ("arc_challenge", {"validation.jsonl": _obqa() + "\n\n" + _obqa() + "\n"}, "validation.jsonl", 2, None),
    ("arc_challenge", {"validation.jsonl": "[1, 2]\n"}, "validation.jsonl", 1, None),
    ("piqa", {"valid.jsonl": '{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2, "valid-labels.lst": "0\n2\n"},
     "valid-labels.lst", 2, "label"),
    ("piqa", {"valid.jsonl": '{"goal": "g", "sol1": "a", "sol2": "b"}\n' * 2, "valid-labels.lst": "0\n"},
     "valid-labels.lst", 2, "label"),
    ("piqa", {"valid.jsonl": '{"goal": "g", "sol1": "a", "sol2": "b"}\n', "valid-labels.lst": "0\n1\n"},
     "valid-labels.lst", 2, "label"),
    ("piqa", {"valid.jsonl": '{"goal": "g", "sol2": "b"}\n', "valid-labels.lst": "0\n"},
     "valid.jsonl", 1, "sol1"),
    ("hellaswag", {"validation.jsonl": json.dumps({"activity_label": "a", "ctx_a": "b", "ctx_b": "c",
                                                   "endings": ["x", "y"], "label": 2}) + "\n"},
     "validation.jsonl", 1, "label"),
    ("hellaswag", {"validation.jsonl": json.dumps({"activity_label": "a", "ctx_a": "b", "ctx_b": "c",
                                                   "endings": ["x", 3], "label": 0}) + "\n"},
     "validation.jsonl", 1, "endings[1]"),
    ("sciq", {"validation.json": '[\n {"question": "q", "distractor1": "a", "distractor2": "b",\n'
                                 '  "distractor3": "c", "correct_answer": "d", "support": ""},\n'
                                 ' {"question": "q", "distractor1": "a", "distractor2": "b",\n'
                                 '  "distractor3": "c", "support": ""}\n]\n'},
     "validation.json", 4, "correct_answer"),
    ("sciq", {"validation.json": '{"question": "q"}\n'}, "validation.json", 1, None),
    ("webquestions", {"validation.jsonl": '{"question": "q", "answers": []}\n'}, "validation.jsonl", 1, "answers"),
    ("webquestions", {"validation.jsonl": '{"answers": ["a"]}\n'}, "validation.jsonl", 1, "question"),
    ("race", {"validation.jsonl.gz": [GOOD_RACE, {**GOOD_RACE, "answers": ["E"]}]},
     "validation.jsonl.gz", 2, "answers[0]"),
    ("race", {"validation.jsonl.gz": [{**GOOD_RACE, "options": [["1", "2", "3"]]}]},
     "validation.jsonl.gz", 1, "options[0]"),
    ("race", {"validation.jsonl.gz": [{**GOOD_RACE, "answers": ["A", "B"]}]},
     "validation.jsonl.gz", 1, "answers"),
    # substrings of "ABCD" are not letters
    ("race", {"validation.jsonl.gz": [GOOD_RACE, {**GOOD_RACE, "answers": ["BC"]}]},
     "validation.jsonl.gz", 2, "answers[0]"),
    ("race", {"validation.jsonl.gz": [{**GOOD_RACE, "answers": [""]}]},
     "validation.jsonl.gz", 1, "answers[0]"),
    # a superscript two passes str.isdigit() but is no label
    ("hellaswag", {"validation.jsonl": json.dumps({"activity_label": "a", "ctx_a": "b", "ctx_b": "c",
                                                   "endings": ["x", "y"], "label": "\u00b2"}) + "\n"},
     "validation.jsonl", 1, "label"),
    ("sciq", {"validation.json": "[]\n[]\n"}, "validation.json", 2, None),
]


def _write(folder: Path, name: str, content) -> None:
    path = folder / name
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in content)
    else:
        path.write_text(content, encoding="utf-8")


@pytest.mark.parametrize("task,files,bad_file,line,field", MALFORMED)
def test_malformed_rows_name_file_line_and_field(tmp_path, task, files, bad_file, line, field):
    folder = tmp_path / task
    folder.mkdir()
    for name, content in files.items():
        _write(folder, name, content)
    with pytest.raises(TaskDataError) as info:
        load_task(task, "validation", tmp_path)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.path == folder / bad_file and err.line == line and err.field == field
    message = str(err)
    assert str(folder / bad_file) in message and f"line {line}" in message
    if field:
        assert f"'{field}'" in message


def test_task_data_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(TaskDataError("/x/f.jsonl", 3, "label", "missing")))
    assert (str(err), err.line, err.field) == ("/x/f.jsonl, line 3: field 'label': missing", 3, "label")


def test_missing_file_is_reported(tmp_path):
    (tmp_path / "sciq").mkdir()
    with pytest.raises(FileNotFoundError, match="validation.json"):
        load_task("sciq", "validation", tmp_path)
