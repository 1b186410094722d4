"""Adapter / full fine-tuning through transformers' Trainer, on tiny random models."""

import logging

import pytest
import torch
from conftest import calib_batches, tiny_model, tiny_tokenizer
from transformers import TrainerCallback

from gradot.artifacts import plug_in, save_adapter
from gradot.methods.crash import crash_emulator
from gradot.methods.uniform import uniform_emulator
from gradot.finetune import (
    CheckpointConflictError,
    TASK_LR,
    TRAINABLE_FILE,
    CausalLMCollator,
    FinetuneConfig,
    FinetuneDataset,
    default_learning_rate,
    encode_pair,
    finetune_adapter,
    finetune_full,
    last_checkpoint,
    lora_target_modules,
)
from gradot.registry import decoder_layers
from gradot.split import split_model

pytestmark = [pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
              pytest.mark.usefixtures("one_thread")]


# Six distinct examples: with batch_size 2 an epoch is 3 steps, so 4 steps cross an epoch boundary
# and a resume at step 2 lands mid-epoch (data position and shuffling both matter).
RECORDS = [
    ("Question : the a of b Answer :", " c"),
    ("Question : d and e Answer :", " f g"),
    ("Question : is h in i Answer :", " j"),
    ("Question : k to l Answer :", " m n o"),
    ("Question : p on q Answer :", " r"),
    ("Question : s with t Answer :", " u v"),
]


def _emulator(kind="uniform"):
    model = tiny_model("llama")
    split = split_model(model, 2)
    if kind == "crash":
        return model, crash_emulator(model, split, 0.5, calib_batches())
    return model, uniform_emulator(model, split, 0.5)


def _cfg(tmp_path, name="run", **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=2, batch_size=2, learning_rate=1e-2,
                logging_steps=1, save_steps=100, lora_dropout=0.0)
    base.update(kw)
    return FinetuneConfig(**base)


def _snapshot(model):
    # On the CPU: with a GPU visible the Trainer moves the model there.
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}


def _adapter_names(emu):
    return {f"model.layers.{pos}." for pos in emu.adapter_positions}


def _is_adapter(name, emu):
    return any(name.startswith(prefix) for prefix in _adapter_names(emu))


# --------------------------------------------------------------------------------------------- data


def test_collator_puts_loss_on_answer_tokens_only():
    tok = tiny_tokenizer()
    ds = FinetuneDataset(tok, [("Question : a b Answer :", " c d"), ("the cat", " e")], max_length=32)
    batch = CausalLMCollator(tok.pad_token_id)([ds[0], ds[1]])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prompt0 = tok("Question : a b Answer :")["input_ids"]
    cont0 = tok(" c d", add_special_tokens=False)["input_ids"]
    assert ids[0].tolist() == prompt0 + cont0
    assert labels[0].tolist() == [-100] * len(prompt0) + cont0
    # Second row: shorter, right-padded with the pad id; padding carries no loss and no attention.
    n1 = len(ds[1]["input_ids"])
    assert ids[1, n1:].eq(tok.pad_token_id).all() and labels[1, n1:].eq(-100).all()
    assert mask[1].tolist() == [1] * n1 + [0] * (ids.shape[1] - n1)
    assert labels[1, :n1].tolist() == [-100] * (n1 - 1) + [tok.convert_tokens_to_ids("e")]
    assert ds.loss_tokens == 3


def test_pairs_tokenize_like_the_harness_and_truncate_from_the_left():
    tok = tiny_tokenizer()
    # Trailing whitespace of the prompt moves to the continuation (harness _encode_pair).
    assert encode_pair(tok, "a b ", "c") == encode_pair(tok, "a b", " c")
    ctx, cont = encode_pair(tok, "a b c d e f", " g h")
    ds = FinetuneDataset(tok, [("a b c d e f", " g h")], max_length=4)
    item = ds[0]
    assert item["input_ids"] == (ctx + cont)[-4:] == ctx[-2:] + cont
    assert item["labels"] == [-100, -100] + cont
    with pytest.raises(ValueError, match="record 0"):
        FinetuneDataset(tok, [("a b", "")])


def test_plain_text_is_all_loss_and_windowed():
    tok = tiny_tokenizer()
    text = " ".join("abcdefghij")  # 10 tokens
    ds = FinetuneDataset(tok, [text], max_length=4)
    assert [len(ds[i]["input_ids"]) for i in range(len(ds))] == [4, 4, 2]
    assert all(ds[i]["labels"] == ds[i]["input_ids"] for i in range(len(ds)))


def test_config_defaults_and_validation(tmp_path):
    assert set(TASK_LR) >= {"openbookqa", "piqa", "arc_easy", "arc_challenge", "hellaswag", "sciq",
                            "webquestions", "race", "default"}
    assert default_learning_rate("piqa") == TASK_LR["piqa"]
    assert default_learning_rate(None, full=True) < default_learning_rate(None)
    assert FinetuneConfig.help()["lora_r"]
    with pytest.raises(ValueError, match="warmup_ratio"):
        FinetuneConfig(output_dir=str(tmp_path), warmup_ratio=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        FinetuneConfig(output_dir=str(tmp_path), batch_size=0)


# --------------------------------------------------------------------------------------------- training


def test_adapter_finetune_changes_only_adapter_parameters(tmp_path):
    _, emu = _emulator()
    tok = tiny_tokenizer()
    before = _snapshot(emu.model)
    flags = [p.requires_grad for p in emu.model.parameters()]
    emu, stats = finetune_adapter(emu, tok, RECORDS, _cfg(tmp_path))
    after = _snapshot(emu.model)
    assert set(after) == set(before)
    for name, t in before.items():
        if _is_adapter(name, emu):
            assert not torch.equal(t, after[name]), f"{name} did not train"
        else:
            assert torch.equal(t, after[name]), f"{name} changed but is not an adapter parameter"
    assert [p.requires_grad for p in emu.model.parameters()] == flags
    assert stats["steps"] == 2 and len(stats["loss_history"]) == 2
    assert stats["trainable_parameters"] == sum(p.numel() for p in emu.adapter_parameters())
    assert stats["seconds_per_step"] > 0 and stats["tokens_per_second"] > 0
    assert (tmp_path / "run" / "checkpoint-2" / TRAINABLE_FILE).is_file()
    assert not (tmp_path / "run" / "checkpoint-2" / "training_args.bin").exists()


def test_lora_merges_into_adapter_layers_and_plugs_in(tmp_path):
    model, emu = _emulator()
    tok = tiny_tokenizer()
    targets = lora_target_modules(emu.model, emu.adapter_positions)
    assert "model.layers.0.self_attn.q_proj" in targets and all(_is_adapter(t + ".", emu) for t in targets)
    assert len(targets) == 7 * len(emu.adapter_positions)
    before = _snapshot(emu.model)
    emu, stats = finetune_adapter(emu, tok, RECORDS, _cfg(tmp_path, lora_r=4, lora_dropout=0.1))
    after = _snapshot(emu.model)
    assert set(after) == set(before), "LoRA modules left in the model"
    assert stats["trainable_parameters"] < sum(p.numel() for p in emu.adapter_parameters())
    for name, t in before.items():
        changed = not torch.equal(t, after[name])
        is_linear = name.endswith("proj.weight")
        assert changed == (_is_adapter(name, emu) and is_linear), name
    save_adapter(emu, tmp_path / "adapter", training=stats)
    plug_in(model, tmp_path / "adapter")
    layers, emu_layers = decoder_layers(model), decoder_layers(emu.model)
    for src, pos in zip(emu.adapter_sources, emu.adapter_positions):
        for (n, a), (_, b) in zip(layers[src].state_dict().items(), emu_layers[pos].state_dict().items()):
            assert torch.equal(a, b.cpu()), n


def test_same_seed_same_weights_and_resume_matches_uninterrupted(tmp_path):
    tok = tiny_tokenizer()
    common = dict(lr_scheduler="constant", save_steps=2)
    _, a = _emulator()
    a, _ = finetune_adapter(a, tok, RECORDS, _cfg(tmp_path, "a", max_steps=4, **common))
    _, b = _emulator()
    b, _ = finetune_adapter(b, tok, RECORDS, _cfg(tmp_path, "b", max_steps=4, **common))
    for (n, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), f"{n}: same seed, different result"

    _, c = _emulator()
    finetune_adapter(c, tok, RECORDS, _cfg(tmp_path, "c", max_steps=2, **common))  # "interrupted" at 2
    assert last_checkpoint(tmp_path / "c").name == "checkpoint-2"
    _, c = _emulator()  # a fresh process: untrained weights, restored from the checkpoint
    c, stats = finetune_adapter(c, tok, RECORDS, _cfg(tmp_path, "c", max_steps=4, resume=True, **common))
    assert stats["resumed_from"].endswith("checkpoint-2") and stats["steps"] == 4 and stats["steps_this_run"] == 2
    for (n, x), y in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), f"{n}: resumed run differs by {(x - y).abs().max():.2e}"


def test_a_torn_trainer_state_falls_back_to_the_previous_checkpoint(tmp_path, caplog):
    """A kill during the Trainer's own write of trainer_state.json (issue 14): resume continues from
    the previous complete checkpoint, says so in one line, and still matches an uninterrupted run."""
    tok = tiny_tokenizer()
    common = dict(lr_scheduler="constant", save_steps=2)
    _, a = _emulator()
    a, _ = finetune_adapter(a, tok, RECORDS, _cfg(tmp_path, "a", max_steps=4, **common))
    _, c = _emulator()
    finetune_adapter(c, tok, RECORDS, _cfg(tmp_path, "c", max_steps=4, **common))  # checkpoints 2 and 4
    state = tmp_path / "c" / "checkpoint-4" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    _, c = _emulator()
    with caplog.at_level(logging.WARNING, logger="gradot.finetune"):
        c, stats = finetune_adapter(c, tok, RECORDS, _cfg(tmp_path, "c", max_steps=4, resume=True, **common))
    assert stats["resumed_from"].endswith("checkpoint-2") and stats["steps_this_run"] == 2
    warned = [r.getMessage() for r in caplog.records if "trainer state unreadable" in r.getMessage()]
    assert warned and warned[0] == ("checkpoint-4: trainer state unreadable (a write was interrupted); "
                                    "using checkpoint-2 instead"), warned
    for (n, x), y in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), f"{n}: resumed run differs by {(x - y).abs().max():.2e}"


def test_resumed_run_records_the_whole_runs_loss(tmp_path):
    # Logging every 10 steps: a 4-step run logs no interval of its own; the loss must still cover
    # every step, also when the run is resumed (the Trainer's train_loss covers only its own steps,
    # and is 0.0 for a finished run resumed).
    tok = tiny_tokenizer()
    common = dict(lr_scheduler="constant", save_steps=2, logging_steps=10)
    _, a = _emulator()
    a, whole = finetune_adapter(a, tok, RECORDS, _cfg(tmp_path, "a", max_steps=4, **common))
    _, c = _emulator()
    finetune_adapter(c, tok, RECORDS, _cfg(tmp_path, "c", max_steps=2, **common))
    _, c = _emulator()
    _, resumed = finetune_adapter(c, tok, RECORDS, _cfg(tmp_path, "c", max_steps=4, resume=True, **common))
    assert resumed["steps_this_run"] == 2
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=2e-4)
    # Resuming the finished run (6 rows, batch 2: it ends inside an epoch): no step is run (the
    # Trainer alone would run a fifth), the weights are the checkpoint's, the run's loss is kept.
    _, c = _emulator()
    c, finished = finetune_adapter(c, tok, RECORDS, _cfg(tmp_path, "c", max_steps=4, resume=True, **common))
    assert finished["steps_this_run"] == 0 and finished["steps"] == 4
    for (n, x), y in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), n
    assert finished["train_loss"] == pytest.approx(whole["train_loss"], abs=2e-4) and finished["train_loss"] > 0


def test_remove_checkpoints_deletes_only_checkpoints(tmp_path):
    from gradot.finetune import remove_checkpoints

    _, emu = _emulator()
    finetune_adapter(emu, tiny_tokenizer(), RECORDS, _cfg(tmp_path, "x", save_steps=1))
    (tmp_path / "x" / "notes.txt").write_text("mine")
    remove_checkpoints(tmp_path / "x")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["notes.txt"]
    (tmp_path / "x" / "notes.txt").unlink()
    remove_checkpoints(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_checkpoints_of_another_run_are_refused_not_mixed_in(tmp_path):
    tok = tiny_tokenizer()
    _, emu = _emulator()
    finetune_adapter(emu, tok, RECORDS, _cfg(tmp_path, "x", save_steps=1))
    # Without resume: the folder's checkpoints would outlive this run's in the Trainer's rotation.
    with pytest.raises(CheckpointConflictError, match="resume"):
        finetune_adapter(_emulator()[1], tok, RECORDS, _cfg(tmp_path, "x"))
    # Resume with another learning rate, or on other data: not the run the checkpoints belong to.
    with pytest.raises(CheckpointConflictError, match="learning_rate: 0.01 -> 0.001"):
        finetune_adapter(_emulator()[1], tok, RECORDS, _cfg(tmp_path, "x", resume=True, learning_rate=1e-3))
    with pytest.raises(CheckpointConflictError, match="data_sha256"):
        finetune_adapter(_emulator()[1], tok, RECORDS[:-1], _cfg(tmp_path, "x", resume=True))
    # The same run resumes (a longer one too: resuming also continues training).
    _, stats = finetune_adapter(_emulator()[1], tok, RECORDS, _cfg(tmp_path, "x", resume=True, max_steps=3))
    assert stats["resumed_from"].endswith("checkpoint-2") and stats["steps_this_run"] == 1


class _Crash(TrainerCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt("simulated interruption")


def test_interrupted_lora_run_resumes_exactly(tmp_path):
    # Linear schedule, warm-up, LoRA dropout (RNG) and weight decay: all must be restored on resume.
    tok = tiny_tokenizer()
    kw = dict(max_steps=4, save_steps=2, lora_r=4, lora_dropout=0.2, warmup_ratio=0.25, weight_decay=0.1)
    _, a = _emulator()
    a, _ = finetune_adapter(a, tok, RECORDS, _cfg(tmp_path, "a", **kw))
    _, b = _emulator()
    with pytest.raises(KeyboardInterrupt):
        finetune_adapter(b, tok, RECORDS, _cfg(tmp_path, "b", **kw), callbacks=[_Crash()])
    _, b = _emulator()
    b, stats = finetune_adapter(b, tok, RECORDS, _cfg(tmp_path, "b", resume=True, **kw))
    assert stats["steps_this_run"] == 2
    for (n, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-5, rtol=0), f"{n}: resumed run differs by {(x - y).abs().max():.2e}"


def test_full_finetune_changes_everything(tmp_path):
    model = tiny_model("llama")  # tied input/output embeddings
    tok = tiny_tokenizer()
    before = _snapshot(model)
    model, stats = finetune_full(model, tok, RECORDS, _cfg(tmp_path, save_steps=1, learning_rate=None))
    assert stats["learning_rate"] == default_learning_rate(None, full=True)
    after = _snapshot(model)
    assert not torch.equal(before["model.layers.2.mlp.down_proj.weight"], after["model.layers.2.mlp.down_proj.weight"])
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert stats["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert last_checkpoint(tmp_path / "run").name == "checkpoint-2"


def test_crash_emulator_with_shared_layers_trains_and_checkpoints(tmp_path):
    _, emu = _emulator("crash")
    shared = [(pos, s.shares) for pos, s in enumerate(emu.slots) if s.shares is not None]
    assert shared, "expected layer sharing in the CRaSh emulator"
    tok = tiny_tokenizer()
    before = _snapshot(emu.model)
    emu, _ = finetune_adapter(emu, tok, RECORDS, _cfg(tmp_path, save_steps=1))
    emu, stats = finetune_adapter(emu, tok, RECORDS, _cfg(tmp_path, max_steps=3, resume=True, save_steps=1))
    assert stats["resumed_from"].endswith("checkpoint-2") and stats["steps"] == 3
    layers = decoder_layers(emu.model)
    for pos, owner in shared:
        for p, q in zip(layers[pos].parameters(), layers[owner].parameters()):
            assert p is q, "layer sharing broken"
    for name, t in _snapshot(emu.model).items():
        assert torch.equal(t, before[name]) != _is_adapter(name, emu), name
