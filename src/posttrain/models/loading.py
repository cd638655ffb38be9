"""Load any ``AutoModelForCausalLM`` and its tokenizer; optionally wrap it with LoRA adapters."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from posttrain.errors import UserError

MODEL_FILES = ("config.json",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


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
    first = (str(err).strip().splitlines() or [type(err).__name__])[0]
    offline = " (HF_HUB_OFFLINE is set)" if huggingface_hub.is_offline_mode() else ""
    return UserError(f"{flag} {source}: not a local directory and cannot be loaded from the hub{offline}: {first}")


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer; a missing pad token becomes EOS (safe: masks never use the pad id)."""
    check_source(source, "tokenizer", TOKENIZER_FILES)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as err:
        raise hub_error(source, err) from err
    if tokenizer.eos_token_id is None:
        raise UserError(f"--model {source}: the tokenizer has no EOS token; posttrain needs one to teach stopping")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    source: str, trust_remote_code: bool = False, dtype: torch.dtype = torch.float32, flag: str = "--model"
) -> PreTrainedModel:
    """A causal LM from a local directory or hub id, in ``dtype`` (fp32 master weights by default).

    ``flag`` names the option the source came from, for error messages (``--model``, ``--ref``).
    """
    check_source(source, "model", MODEL_FILES, flag)
    try:
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
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
