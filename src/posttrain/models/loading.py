"""Load any ``AutoModelForCausalLM`` and its tokenizer; optionally wrap it with LoRA adapters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import huggingface_hub
import tokenizers
import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from posttrain.errors import UserError

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
SAFETENSORS_WEIGHTS = "model*.safetensors"  # model.safetensors or its shards
PICKLE_WEIGHTS = "pytorch_model*.bin"


def check_source(source: str, what: str, needed: tuple[str, ...], flag: str = "--model") -> None:
    """A local model (``flag``) must be a directory holding one of ``needed``; a missing path is not a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in needed):
            raise UserError(f"{flag} {source}: no {what} in this directory (expected {' or '.join(needed)})")
    elif path.exists():
        raise UserError(f"{flag} {source}: expected a model directory, got a file")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:
        raise UserError(f"{flag} {source}: directory not found")


def hub_error(source: str, err: Exception, flag: str = "--model") -> UserError:
    """transformers' OSError as one line; it names the hub even for a local directory, so say which it was."""
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if Path(source).expanduser().is_dir():
        return UserError(f"{flag} {source}: cannot be loaded: {first}")
    offline = " (HF_HUB_OFFLINE is set)" if huggingface_hub.is_offline_mode() else ""
    return UserError(f"{flag} {source}: not a local directory and cannot be loaded from the hub{offline}: {first}")


def read_json(path: Path, source: str, flag: str) -> Any:
    """A JSON file of a model directory; transformers reports a broken one as a misleading hub error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{flag} {source}: {path.name} is not valid JSON: {err}") from err


def check_config(directory: Path, source: str, flag: str, trust_remote_code: bool) -> None:
    """config.json must name an architecture transformers knows, or ship code the user allowed to run.

    Checked here because transformers answers each of these with a long traceback.
    """
    config = read_json(directory / "config.json", source, flag)
    if not isinstance(config, dict):
        raise UserError(f"{flag} {source}: config.json is not a JSON object")
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return
    if "auto_map" in config:
        if not trust_remote_code:
            raise UserError(
                f"{flag} {source}: the model's repository ships its own code (auto_map in config.json); "
                "--trust-remote-code allows posttrain to run it, which runs that code on your machine"
            )
        return
    if model_type is None:
        raise UserError(f"{flag} {source}: config.json has no model_type, so the architecture is unknown")
    raise UserError(
        f"{flag} {source}: config.json has model_type {model_type!r}, which transformers "
        f"{transformers.__version__} does not know (a newer version may)"
    )


def check_weights(directory: Path, source: str, flag: str) -> None:
    """posttrain loads safetensors only: a pickle can run code when loaded, and a broken file deserves its name."""
    files = sorted(directory.glob(SAFETENSORS_WEIGHTS))
    if not files and any(directory.glob(PICKLE_WEIGHTS)):
        raise UserError(
            f"{flag} {source}: the weights are a pickle (pytorch_model.bin) and posttrain loads safetensors only; "
            "if you trust the file, convert it once in Python: "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    if not files:
        raise UserError(f"{flag} {source}: no model.safetensors in this directory")
    for file in files:
        try:
            with safe_open(file, framework="pt"):
                pass
        except SafetensorError as err:
            raise UserError(f"{flag} {source}: {file.name} cannot be read: {err}") from err


def check_tokenizer_files(directory: Path, source: str, flag: str) -> None:
    """The tokenizer's files must parse; transformers fails on broken ones with a traceback from deep inside."""
    if (directory / "tokenizer_config.json").is_file():
        read_json(directory / "tokenizer_config.json", source, flag)
    path = directory / "tokenizer.json"
    if path.is_file():
        try:
            tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers reports every parse error as a plain Exception
            raise UserError(f"{flag} {source}: tokenizer.json cannot be read: {err}") from err


def check_model_dir(source: str, flag: str, trust_remote_code: bool) -> None:
    """A model source that transformers can load without a traceback (local directories are checked in full)."""
    check_source(source, "model", MODEL_FILES, flag)
    directory = Path(source).expanduser()
    if directory.is_dir():
        check_config(directory, source, flag, trust_remote_code)
        check_weights(directory, source, flag)


def load_tokenizer(source: str, trust_remote_code: bool = False, flag: str = "--model") -> PreTrainedTokenizerBase:
    """The model's tokenizer; a missing pad token becomes EOS (safe: masks never use the pad id)."""
    check_source(source, "tokenizer", TOKENIZER_FILES, flag)
    directory = Path(source).expanduser()
    if directory.is_dir():
        if (directory / "config.json").is_file():  # AutoTokenizer reads it too
            check_config(directory, source, flag, trust_remote_code)
        check_tokenizer_files(directory, source, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise hub_error(source, err, flag) from err
    if tokenizer.eos_token_id is None:
        raise UserError(f"{flag} {source}: the tokenizer has no EOS token; posttrain needs one to teach stopping")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32, flag: str = "--model"
) -> PreTrainedModel:
    """A causal LM from a local directory or hub id, in ``dtype`` (fp32 master weights by default).

    ``flag`` names the option the source came from, for error messages (``--model``, ``--ref``).
    """
    check_model_dir(source, flag, trust_remote_code)
    try:
        return AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as err:
        raise hub_error(source, err, flag) from err


def add_lora(
    model: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: str, task_type: str = "CAUSAL_LM"
) -> PreTrainedModel:
    """Freeze the model and add trainable LoRA adapters (Hu et al. 2021) through ``peft``.

    ``task_type="SEQ_CLS"`` (reward models) keeps the new ``score`` head fully trainable.
    """
    from peft import LoraConfig, get_peft_model  # imported here: only LoRA runs need peft loaded

    targets = "all-linear" if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        raise UserError(f"--lora-target-modules '{target_modules}': {str(err).splitlines()[0]}") from err


def is_peft(model: torch.nn.Module) -> bool:
    """Whether ``model`` is wrapped by ``peft`` (LoRA adapters)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)
