"""Turn a GGUF file (llama.cpp's format) into a plain Hugging Face checkpoint.

``import_gguf`` writes a directory with ``model.safetensors``, ``config.json``,
``generation_config.json`` and the tokenizer files (``tokenizer.json``,
``tokenizer_config.json``, ``chat_template.jinja``), so the rest of the project can
load, fine-tune and save the model like any other Hugging Face checkpoint.

Why not just ``from_pretrained(dir, gguf_file=...)`` everywhere: by default
transformers dequantizes the weights to dense floats but still marks the model as
quantized (``model.hf_quantizer`` is a ``GgufHfQuantizer`` and
``config.quantization_config`` is set). Such a model refuses to be trained and
``save_pretrained`` raises "The model is quantized with gguf and is not serializable".
Loading with ``GgufConfig(dequantize=True)`` is transformers' own way out: every
weight is unpacked at load time (by transformers' GGUF reader, which also undoes
llama.cpp's q/k permutation) and the quantizer and ``quantization_config`` are
removed afterwards, leaving an ordinary model that can be saved once and then
trained from disk.
"""

import os
import shutil
import struct
import uuid
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedConfig, PreTrainedModel
from transformers.integrations.gguf import read_gguf_metadata
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from posttrain.errors import UserError

GGUF_MAGIC = b"GGUF"


def import_gguf(
    gguf_file: str | os.PathLike, output_dir: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> Path:
    """Convert ``gguf_file`` into a Hugging Face checkpoint directory at ``output_dir``.

    Quantized weights are dequantized and stored as ``dtype`` (float32 by default, so
    no precision is lost beyond what the quantization already cost). ``output_dir`` is
    replaced if it exists. Returns ``output_dir`` as a ``Path``.
    Raises ``UserError`` for a missing file, a non-GGUF file, or an architecture
    transformers cannot load from GGUF.
    """
    gguf_path = Path(gguf_file).resolve()
    output_path = Path(output_dir).resolve()
    architecture = _read_architecture(gguf_path)
    config = _load_config(gguf_path, architecture)

    # Everything is written into a sibling temporary directory first (same filesystem,
    # so the final rename is atomic) and only moved into place once complete.
    output_path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 mode would end up on the final directory.
    staging = output_path.with_name(f".{output_path.name}.{uuid.uuid4().hex[:12]}.tmp")
    staging.mkdir()
    try:
        _write_checkpoint(gguf_path, config, dtype, staging)
        _replace_dir(staging, output_path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_path


def _read_architecture(gguf_path: Path) -> str:
    """Check that ``gguf_path`` is a readable GGUF file; return its architecture."""
    if not gguf_path.is_file():
        raise UserError(f"GGUF file {gguf_path} does not exist")
    with gguf_path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    # Checked here rather than left to the reader, whose errors for an empty or
    # foreign file (e.g. "cannot mmap an empty file") do not say what is wrong.
    if magic != GGUF_MAGIC:
        raise UserError(f"{gguf_path} is not a GGUF file (bad magic: {magic!r})")
    try:
        metadata, _ = read_gguf_metadata(str(gguf_path))
    except (ValueError, struct.error, UnicodeDecodeError) as error:
        # Unsupported GGUF version, truncated header, no general.architecture, ...
        raise UserError(f"{gguf_path} is not a readable GGUF file: {error}") from error
    return str(metadata["general.architecture"])


def _load_config(gguf_path: Path, architecture: str) -> PreTrainedConfig:
    """The transformers config rebuilt from the file's metadata (causal LMs only)."""
    try:
        config = AutoConfig.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    except (ValueError, KeyError, NotImplementedError) as error:
        # e.g. ValueError("GGUF model with architecture x is not supported yet.")
        raise UserError(
            f"{gguf_path}: transformers cannot load GGUF architecture {architecture!r} ({error})"
        ) from error
    # A GGUF may hold an encoder (t5encoder, ...), which is no use as a chat model.
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UserError(
            f"{gguf_path}: GGUF architecture {architecture!r} is not a causal language model that transformers can load"
        )
    return config


def _write_checkpoint(gguf_path: Path, config: PreTrainedConfig, dtype: torch.dtype, target: Path) -> None:
    """Dequantize the model, then save weights, configs and tokenizer to ``target``."""
    folder, name = str(gguf_path.parent), gguf_path.name
    model, loading_info = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        config=config,
        dtype=dtype,
        # Makes transformers drop the quantizer after loading (see module docstring).
        quantization_config=GgufConfig(dequantize=True),
        output_loading_info=True,
        local_files_only=True,
    )
    _check_loaded(gguf_path, model, loading_info["missing_keys"])
    model.save_pretrained(target)

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF states the context length but the tokenizer does not know it; left
    # "infinite", truncation=True would silently do nothing.
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions:
        tokenizer.model_max_length = max_positions
    tokenizer.save_pretrained(target)


def _check_loaded(gguf_path: Path, model: PreTrainedModel, missing: set[str]) -> None:
    """Refuse to save a model that is incomplete or still flagged as quantized."""
    # transformers skips GGUF tensors it cannot map and leaves those weights
    # randomly initialised (a wrong shape already raises); never save that.
    if missing:
        raise UserError(
            f"{gguf_path}: transformers found no weights for {len(missing)} parameters, e.g. {sorted(missing)[0]}"
        )
    # Guards against a transformers release where dequantize=True no longer
    # unflags the model: the checkpoint would not save, or could not be trained.
    if getattr(model, "hf_quantizer", None) is not None or hasattr(model.config, "quantization_config"):
        raise RuntimeError("transformers left the GGUF model flagged as quantized after dequantizing")


def _replace_dir(staging: Path, output_path: Path) -> None:
    """Move ``staging`` to ``output_path``, replacing an existing directory there."""
    if not output_path.exists():
        os.rename(staging, output_path)
        return
    # Move the old directory aside before removing it, so output_path is never missing
    # its contents for longer than the two renames.
    old = output_path.with_name(f".{output_path.name}.{uuid.uuid4().hex[:12]}.old")
    os.rename(output_path, old)
    os.rename(staging, output_path)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()
