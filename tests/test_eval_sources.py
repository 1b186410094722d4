"""`gradot eval` beyond the eight tasks: any task lm-evaluation-harness's registry knows (a task file
of one's own on its include path, offline) and the data owner's own held-out file (--data); the
pipeline plot's transfer panel."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_tokenizer  # noqa: E402

CUSTOM_TASK = """task: my_colors
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def test_eval_runs_a_task_of_the_harness_registry(tiny_model_dir, tmp_path, capsys):
    """A task the harness's registry reads from --include-path runs through the harness, offline;
    a name neither gradot nor the harness knows is one line, before the model loads."""
    from gradot.cli import main

    rows = tmp_path / "colors.jsonl"
    rows.write_text("".join(json.dumps({"question": f"the sky is w{i} ?", "choices": ["a", "b", "c"], "gold": i % 3}) + "\n"
                            for i in range(6)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "my_colors.yaml").write_text(CUSTOM_TASK.format(rows=rows))
    out = tmp_path / "results.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--tasks", "my_colors", "--include-path", str(tasks),
                 "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    result = json.loads(out.read_text())["my_colors"]
    assert result["n"] == 6 and 0 <= result["acc"] <= 1
    assert "my_colors: acc" in capsys.readouterr().out

    code = main(["eval", "--model", "no-such-model", "--tasks", "no_such_task_anywhere", "--include-path", str(tasks)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown task(s) ['no_such_task_anywhere']" in err and len(err.splitlines()) == 1


def test_eval_data_reports_the_answer_loss_of_the_owners_file(tiny_model_dir, tmp_path, capsys):
    """--data: the mean answer-token loss (and its exp) over the file's records, encoded as
    finetune --data encodes them: on one pair it is the model's own loss on the answer tokens."""
    from transformers import AutoModelForCausalLM

    from gradot.cli import main
    from gradot.finetune import CausalLMCollator, FinetuneDataset, pad_token_id

    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps([{"instruction": "name a color", "input": "", "output": "the sky is a"}]))
    out = tmp_path / "loss.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--json", str(out)]) == 0
    got = json.loads(out.read_text())[f"data:{data}"]
    assert f"{data}: answer loss" in capsys.readouterr().out

    from gradot.corpora import load_corpus

    (record,) = load_corpus(data)
    tok = tiny_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batch = CausalLMCollator(pad_token_id(tok))([FinetuneDataset(tok, [(record.prompt, record.continuation())])[0]])
    with torch.no_grad():
        want = model(**batch).loss.item()  # transformers' mean over the labelled (answer) tokens
    assert got["answer_loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert got["n"] == 1 and got["tokens"] == int((batch["labels"][:, 1:] != -100).sum())

    text = tmp_path / "notes.txt"
    text.write_text("the cat sat on the mat . " * 40)
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(text), "--max-length", "32",
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())[f"data:{text}"]
    assert got["n"] > 1 and got["tokens"] > 100 and got["answer_loss_stderr"] >= 0

    assert main(["eval", "--model", str(tiny_model_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_transfer_panel_marks_values_outside_and_no_gain():
    """A value outside the panel's range gets its number at the edge; a task where Adapter FT does
    not beat Full ZS by more than the standard error reads "no gain to transfer", not a ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gradot.pipeline_report import TRANSFER_RANGE, _plot_transfer, no_gain_columns

    table = {"Full ZS": {"piqa": (0.60, 0.05), "sciq": (0.50, 0.01), "avg": (0.55, 0.03)},
             "Adapter FT": {"piqa": (0.61, 0.05), "sciq": (0.70, 0.01), "avg": (0.655, 0.03)}}
    cols = ["piqa", "sciq", "avg"]
    assert no_gain_columns(table, cols) == {"piqa"}  # +0.01 against a 0.07 standard error
    fig, ax = plt.subplots()
    _plot_transfer(ax, {"gradot": {"piqa": (3.0, 17.8), "sciq": (2.4, 0.2), "avg": (0.0, 0.1)}}, cols, {"piqa"})
    texts = [t.get_text() for t in ax.texts]
    assert "no gain\nto transfer" in texts and "2.4" in texts and "3.0" not in texts
    assert ax.get_ylim()[0] < TRANSFER_RANGE[0] and ax.get_ylim()[1] > TRANSFER_RANGE[1]
    heights = [round(p.get_height(), 6) for p in ax.patches]
    assert TRANSFER_RANGE[1] in heights and 0.0 in heights  # clipped at the edge; the 0.0 bar drawn
    plt.close(fig)
