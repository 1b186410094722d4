"""Fine-tuning with transformers' ``Trainer``: the adapter on an emulator, or a whole model (Full FT).

The data owner's step of offsite-tuning (docs/method.md, section 1, step 3): only the adapter layers (the bottom
and top ``k`` decoder layers, ``Emulator.adapter_parameters()``) are trained; embeddings, final norm,
head and the compressed middle stay frozen. ``finetune_full`` trains every parameter of an original
model, the "Full FT" upper bound of the result tables (docs/method.md, section 1).

Training runs through ``transformers.Trainer``, so ``accelerate launch`` (multi-GPU DDP), bf16,
gradient accumulation, its tqdm progress bar and its log history work unchanged. The loss applies
the LM head only at labelled positions, in chunks (:mod:`gradot.evaluation.head_loss`, the model's own loss to
float rounding; ``FinetuneConfig.head_at_labels=False`` for the model's full-logits loss).

Data
----
``records`` is a list whose items are either

* ``(prompt, continuation)`` pairs, e.g. ``("Question: capital of France?\\nAnswer:", " Paris")``:
  the loss is on the continuation tokens only (labels are -100 on the prompt and on padding), or
* plain strings: language-modelling loss on every token. A string longer than ``max_length``
  tokens is cut into consecutive windows of ``max_length`` tokens.

A pair is tokenized exactly as lm-evaluation-harness (0.4.x, causal models) encodes a
context/continuation pair for scoring: trailing whitespace of the prompt moves to the continuation,
``prompt + continuation`` and ``prompt`` are encoded with the tokenizer's default special tokens,
and the continuation's ids are the whole encoding minus the prompt's length. The model is therefore
trained on the very token sequence it is scored on. Sequences longer than ``max_length`` are
truncated from the LEFT (the start of the prompt goes first), as the harness does.

Checkpoints and resuming
------------------------
Checkpoints (``output_dir/checkpoint-<step>``, every ``save_steps`` and at the end) hold only the
TRAINABLE parameters, in ``trainable.safetensors``: the adapter (or the LoRA matrices) rather than
the whole emulator, which is faster and sidesteps safetensors' refusal of shared tensors (tied
embeddings, CRaSh layer sharing). ``resume=True`` restores them from the newest complete checkpoint,
together with the optimizer, scheduler, RNG states and data position, and ends with the same weights
as an uninterrupted run of the same seed. The optimizer, scheduler and RNG files
(``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``) are the ``Trainer``'s own, written by it into
the checkpoint and read back by it with ``torch.load(weights_only=True)``; model weights are never
read from a pickle, and no ``training_args.bin`` pickle is written.

``output_dir/gradot_run.json`` records the settings and a hash of the data the checkpoints were
trained with. A run refuses a folder holding checkpoints unless it resumes, and a resume refuses
checkpoints trained with other settings or data (either would silently mix two runs); only the
length (``max_steps``, ``epochs``) may change on resume.

Modules: ``data`` (encoding, dataset, collator), ``checkpoints`` (trainable parameters on disk),
``training`` (config, ``Trainer`` run, LoRA, the two entry points).
"""

from ..errors import CheckpointConflictError
from .checkpoints import (
    TRAINABLE_FILE,
    last_checkpoint,
    load_trainable,
    remove_checkpoints,
    save_trainable,
    trainable_parameters,
)
from .data import CausalLMCollator, FinetuneDataset, encode_pair, pad_token_id, task_records
from .training import (
    FULL_LR,
    TASK_LR,
    FinetuneConfig,
    default_learning_rate,
    finetune_adapter,
    finetune_full,
    lora_target_modules,
    output_head,
    run_loss,
)

__all__ = [
    "FULL_LR",
    "TASK_LR",
    "TRAINABLE_FILE",
    "CausalLMCollator",
    "CheckpointConflictError",
    "FinetuneConfig",
    "FinetuneDataset",
    "default_learning_rate",
    "encode_pair",
    "finetune_adapter",
    "finetune_full",
    "last_checkpoint",
    "load_trainable",
    "lora_target_modules",
    "output_head",
    "pad_token_id",
    "remove_checkpoints",
    "run_loss",
    "save_trainable",
    "task_records",
    "trainable_parameters",
]
