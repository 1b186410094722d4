"""Tiny random models built from configs: every registered architecture, no download."""

import pytest
import torch

from gradot.modeling import random_model

VOCAB = 128


def tiny_config(model_type: str, layers: int = 6):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if model_type == "mistral":
        return MistralConfig(**common)
    if model_type == "qwen2":
        return Qwen2Config(**common)
    if model_type == "qwen3":
        return Qwen3Config(**common, head_dim=8)
    if model_type == "gpt_neox":
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                             num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5)
    if model_type == "phi3":
        from transformers import Phi3Config

        return Phi3Config(**common, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if model_type in ("gemma2", "gemma3_text"):
        from transformers import Gemma2Config, Gemma3TextConfig

        cls = Gemma2Config if model_type == "gemma2" else Gemma3TextConfig
        return cls(**common, head_dim=8, sliding_window=4)
    if model_type == "opt":
        return OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                         num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32)
    if model_type == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=128)
    raise ValueError(model_type)


ARCHS = ["llama", "mistral", "qwen2", "opt", "gpt2", "gpt_neox", "phi3", "gemma2"]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    tiny models gain nothing from intra-op threads, and spinning OpenMP workers slow training badly
    when the machine's cores are busy with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=ARCHS)
def arch_name(request):
    return request.param


def tiny_model(model_type: str, layers: int = 6, seed: int = 0):
    model = random_model(tiny_config(model_type, layers), seed=seed)
    # Random init leaves biases and norms at trivial values; perturb everything so that exactness
    # tests would notice a dropped bias or a mis-copied norm.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


@pytest.fixture
def tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (2, 16), generator=g)


def calib_batches(n: int = 4, seq: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, VOCAB, (n, seq), generator=g).split(2))


def tiny_tokenizer():
    """A word-level tokenizer over VOCAB entries (unknown words map to [UNK]); no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "[EOS]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words += ["the", "of", "and", "to", "in", "a", "is", "was", "for", "on", "as", "with", "by", "at", ".", ",",
              "Question", ":", "Answer", "he", "it", "from", "that", "his", "an", "are", "=", "@", "-"]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny Llama saved as a local Hugging Face folder (model + tokenizer), as a user would have."""
    model = tiny_model("llama")
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(("the cat sat on the mat and it was a good day for a walk in the park . " * 200))
    return path
