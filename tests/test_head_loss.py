"""The head-at-labels loss equals the model's own full-logits loss, value and gradients."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from gradot.finetune import CausalLMCollator, FinetuneConfig, FinetuneDataset, output_head
from gradot.finetune.training import _trainer_class, _training_arguments, _with_lora
from gradot.evaluation.head_loss import HeadAtLabels, head_at_labels_loss, linear_cross_entropy

PAIRS = [
    ("Question : the a of b Answer :", " c"),
    ("Question : d and e is the f of g to h Answer :", " i j k"),
    ("Question : l Answer :", " m n"),
]
TEXTS = ["the a of b and c to d in e is f was g for h on i as j with k by l at m", "n o p q r s t"]


def _batch(records, max_length=64):
    tok = tiny_tokenizer()
    data = FinetuneDataset(tok, records, max_length)
    return CausalLMCollator(tok.pad_token_id)([data[i] for i in range(len(data))])


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, batch, num_items=None):
    """The model's own loss (full logits, transformers' ForCausalLMLoss) and its gradients."""
    model.zero_grad()
    extra = {"num_items_in_batch": num_items} if num_items is not None else {}
    loss = model(**batch, **extra).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _head_at_labels(model, batch, num_items=None, chunk_rows=None):
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with HeadAtLabels(output_head(model), chunk_rows) as hal:
        out = model(**inputs)
        assert out.logits.shape[1] == 0  # the head ran on nothing
        loss = hal.loss(batch["labels"], num_items)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_same(ref, new):
    (ref_loss, ref_grads), (new_loss, new_grads) = ref, new
    torch.testing.assert_close(new_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert ref_grads.keys() == new_grads.keys() and ref_grads
    for name in ref_grads:
        torch.testing.assert_close(new_grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("records", [PAIRS, TEXTS], ids=["pairs", "texts"])
@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_same_loss_and_gradients_as_full_logits(arch, records):
    model = tiny_model(arch).eval()  # eval: no dropout, so both passes see the same network
    batch = _batch(records)
    ref = _reference(model, batch)
    _assert_same(ref, _head_at_labels(model, batch))
    _assert_same(ref, _head_at_labels(model, batch, chunk_rows=3))  # several chunks, a ragged last one


@pytest.mark.parametrize("records", [PAIRS, TEXTS], ids=["pairs", "texts"])
def test_same_loss_and_gradients_with_lora(records, tmp_path):
    model = tiny_model("llama")
    cfg = FinetuneConfig(output_dir=str(tmp_path), lora_r=4, lora_dropout=0.0)
    peft_model = _with_lora(model, [0, 5], cfg).eval()
    with torch.no_grad():  # LoRA's B starts at zero: make the adapter matter
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    batch = _batch(records)
    ref = _reference(peft_model, batch)
    assert all("lora_" in n for n in ref[1])
    _assert_same(ref, _head_at_labels(peft_model, batch, chunk_rows=4))


def test_normalised_by_the_trainers_token_count():
    model = tiny_model("llama").eval()
    batch = _batch(PAIRS)
    _assert_same(_reference(model, batch, num_items=torch.tensor(17)),
                 _head_at_labels(model, batch, num_items=torch.tensor(17)))


def test_trainer_loss_equals_the_models_own(tmp_path):
    """Through the Trainer's compute_loss, with the head skipped, as training runs it."""
    model = tiny_model("qwen2").eval()
    batch = _batch(PAIRS)
    args = _training_arguments(FinetuneConfig(output_dir=str(tmp_path)), 1e-3)
    trainer = _trainer_class()(model=model, args=args, head_at_labels=HeadAtLabels(output_head(model)))
    got = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(5))
    want = model(**batch, num_items_in_batch=torch.tensor(5)).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_shift_matters():
    """The check is sharp: a loss without the causal shift differs."""
    model = tiny_model("llama")
    batch = _batch(PAIRS)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"]).last_hidden_state
        right = head_at_labels_loss(hidden, batch["labels"], model.lm_head)
        unshifted = torch.cat([batch["labels"][:, :1], batch["labels"]], dim=1)[:, :-1]
        wrong = head_at_labels_loss(hidden, unshifted, model.lm_head)
        want = model(**batch).loss
    torch.testing.assert_close(right, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(wrong, want, rtol=1e-3)


def test_chunks_hold_at_most_chunk_rows_of_logits(monkeypatch):
    sizes = []
    real_logsumexp = torch.logsumexp
    monkeypatch.setattr(torch, "logsumexp", lambda x, dim: sizes.append(x.shape) or real_logsumexp(x, dim))
    torch.manual_seed(0)
    h, w, y = torch.randn(10, 8), torch.randn(50, 8), torch.randint(0, 50, (10,))
    loss = linear_cross_entropy(h, w, y, chunk_rows=4)
    assert sizes == [(4, 50), (4, 50), (2, 50)]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(h @ w.T, y, reduction="sum"))


def test_bf16_autocast_matches_the_heads_own_precision():
    torch.manual_seed(0)
    h, w, y = torch.randn(6, 16), torch.randn(40, 16), torch.randint(0, 40, (6,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w).float(), y, reduction="sum")
        got = linear_cross_entropy(h, w, y)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
