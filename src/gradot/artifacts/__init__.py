"""Emulator and adapter artifacts: safetensors + JSON manifest, validated on every load.

Layout of an emulator directory::

    config.json            the emulator's config (the base config with the emulator's depth)
    emulator.safetensors   adapter layers, compressed middle, embeddings, norm, head
    manifest.json          format, method, sizes, per-slot shapes, fingerprint, file hashes

An adapter directory holds ``adapter.safetensors`` (tensors named as in the ORIGINAL model) and
``manifest.json`` carrying the base fingerprint of the emulator it was trained on.

Nothing here ever unpickles: tensors come only from safetensors files, and every file is checked
against the manifest (hash, tensor names, dtypes, shapes, finite values) before use.

One module per job: ``files`` (safe reads, atomic outputs, hashes, tensor files), ``manifest`` (schema
and validation, ``describe``), ``emulator_io`` (save, load, ``verify``), ``tokenizer`` (the shipped
tokenizer, bounded and probed), ``adapter_io`` (save, plug into the model or the emulator).
"""

from ..errors import ArtifactError, printable
from .adapter_io import (DEFAULT_MAX_CHANGE, PLAUSIBLE_CHANGE, change_refusal, plug_in, plug_into_emulator,
                         relative_change, save_adapter)
from .emulator_io import load_emulator, read_config, save_emulator, verify
from .files import (
    ADAPTER_FILE,
    CONFIG_FILE,
    EMULATOR_FILE,
    MANIFEST,
    atomic_directory,
    check_listed_files,
    claim_output,
    read_tensors,
    refuse_existing,
    sha256_file,
)
from .manifest import describe, emulator_split, read_manifest
from .tokenizer import load_emulator_tokenizer

__all__ = ["ADAPTER_FILE", "CONFIG_FILE", "DEFAULT_MAX_CHANGE", "EMULATOR_FILE", "MANIFEST", "PLAUSIBLE_CHANGE",
           "ArtifactError", "atomic_directory", "change_refusal", "check_listed_files", "claim_output", "describe",
           "emulator_split",
           "load_emulator", "load_emulator_tokenizer", "plug_in", "plug_into_emulator", "printable",
           "read_config", "read_manifest", "read_tensors", "refuse_existing", "relative_change", "save_adapter", "save_emulator",
           "sha256_file", "verify"]
