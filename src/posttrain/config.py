"""Typed stage configs: one dataclass per stage, filled from defaults < YAML < flags.

Every field of a stage's config dataclass is both a YAML key and a command-line flag
(``learning_rate`` <-> ``--learning-rate``); its ``help`` metadata is the flag's help.
Unknown YAML keys and values of the wrong type are errors that name the valid choices,
so a typo never silently trains with a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import yaml

from posttrain.errors import UserError


def option(default: Any, help: str, needs: str = "", needs_one_of: tuple = ()) -> Any:
    """A config field with its help text (shown by ``--help`` next to the default).

    ``needs`` names the option this one only tunes (and ``needs_one_of`` the values of it that use
    this one; empty: any value but the default): set without it, the option would do nothing, so
    ``refuse_idle_options`` refuses it."""
    return field(default=default, metadata={"help": help, "needs": needs, "needs_one_of": needs_one_of})


@dataclass
class TrainConfig:
    """Options shared by every training stage."""

    model: str = option("", "model to start from: a local directory or a hub id")
    data: str = option("", "training data: a .jsonl/.json/.parquet/.csv file or a hub id")
    output: str = option("", "output directory (becomes a Hugging Face checkpoint)")
    data_split: str = option("train", "split to read from --data")
    eval_data: str = option("", "held-out data file or hub id (optional)")
    eval_split: float = option(0.0, "fraction of --data held out for evaluation when --eval-data is not given")
    max_steps: int = option(-1, "optimizer steps to run; -1 means --epochs passes over the data")
    epochs: int = option(1, "passes over the training data (when --max-steps is -1)")
    batch_size: int = option(8, "examples per micro-batch on each process")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    learning_rate: float = option(2e-5, "peak learning rate of AdamW")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    lr_scheduler: Literal["linear", "cosine", "constant"] = option("linear", "learning-rate decay after warmup")
    warmup_ratio: float = option(0.0, "fraction of the steps spent in linear warmup")
    max_grad_norm: float = option(1.0, "gradient clipping norm; 0 disables clipping")
    max_length: int = option(1024, "maximum sequence length in tokens")
    truncation: Literal["truncate", "drop"] = option("truncate", "what to do with sequences over --max-length")
    group_by_length: bool = option(False, "batch examples of similar length together to waste less padding")
    seed: int = option(42, "random seed (data order, initialisation of new weights, dropout)")
    data_seed: int = option(-1, "seed of the data order alone; -1: use --seed")
    logging_steps: int = option(10, "write metrics every N optimizer steps")
    eval_steps: int = option(0, "evaluate every N steps (0: only at the end)")
    save_steps: int = option(500, "write a resumable checkpoint every N steps (0: only at the end)")
    save_total_limit: int = option(2, "keep only the newest N checkpoints")
    resume: bool = option(False, "continue from the newest checkpoint in OUTPUT/checkpoints")
    overwrite: bool = option(False, "replace an existing non-empty OUTPUT")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "autocast precision (fp16 needs a GPU)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    trust_remote_code: bool = option(False, "allow model code from the model's repository to run")
    lora_r: int = option(0, "LoRA rank; 0 trains all weights")
    lora_alpha: int = option(16, "LoRA alpha", needs="lora_r")
    lora_dropout: float = option(0.05, "LoRA dropout", needs="lora_r")
    lora_target_modules: str = option(
        "all-linear", "comma-separated module names LoRA adapts, or all-linear", needs="lora_r"
    )
    report_to: Literal["none", "tensorboard", "wandb", "trackio"] = option(
        "none", "also send metrics to this tracker (its package must be installed)"
    )
    HELD_OUT: ClassVar[tuple[str, ...]] = ("eval_data", "eval_split")  # what --eval-steps evaluates on

    def validate(self) -> None:
        """Checks shared by every stage, before any work starts; raises UserError naming the option."""
        for name in ("model", "data", "output"):
            if not getattr(self, name):
                raise UserError(f"{flag(name)} is required (or set `{name}:` in the config file)")
        check_finite_floats(self)
        for name in ("batch_size", "grad_accum", "max_length", "epochs", "logging_steps"):
            require(self, name, getattr(self, name) >= 1, "at least 1")
        for name in ("eval_steps", "save_steps", "save_total_limit", "lora_r", "seed", "weight_decay", "max_grad_norm"):
            require(self, name, getattr(self, name) >= 0, "non-negative")
        require(self, "max_steps", self.max_steps == -1 or self.max_steps >= 1, "-1 (use --epochs) or at least 1")
        require(self, "data_seed", self.data_seed >= -1, "-1 (use --seed) or non-negative")
        require(self, "learning_rate", self.learning_rate > 0, "positive")
        require(self, "adam_epsilon", self.adam_epsilon > 0, "positive")
        for name in ("adam_beta1", "adam_beta2", "eval_split", "lora_dropout"):
            require(self, name, 0.0 <= getattr(self, name) < 1.0, "in [0, 1)")
        require(self, "warmup_ratio", 0.0 <= self.warmup_ratio <= 1.0, "in [0, 1]")
        require(self, "lora_alpha", self.lora_alpha >= 1 or not self.lora_r, "at least 1")
        if self.eval_split and self.eval_data:
            raise UserError("give either --eval-data or --eval-split, not both")
        if self.eval_steps and not any(getattr(self, name) for name in self.HELD_OUT):
            held_out = " or ".join(map(flag, self.HELD_OUT))
            raise UserError(f"--eval-steps needs {held_out} (the held-out data it evaluates)")
        if self.max_steps != -1 and self.epochs != 1:
            raise UserError(f"--epochs {self.epochs} has no effect with --max-steps {self.max_steps}; give one of them")
        for name in ("data", "eval_data"):
            if self.data_split != "train" and Path(getattr(self, name)).expanduser().is_file():
                raise UserError(f"--data-split picks a split of a hub dataset; {flag(name)} {getattr(self, name)} is a "
                                "file, which has one")  # fmt: skip
        refuse_idle_options(self)
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; choose one")
        if self.mixed_precision == "fp16" and not torch.accelerator.is_available():
            raise UserError("--mixed-precision fp16 needs a GPU and this machine has none; use bf16 or no")


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


def require(config: Any, name: str, holds: bool, meaning: str) -> None:
    """Raise a UserError naming ``--name`` unless ``holds``."""
    if not holds:
        raise UserError(f"{flag(name)} must be {meaning}, got {getattr(config, name)}")


def refuse_idle_options(config: Any) -> None:
    """Refuse an option set away from its default while the option it tunes (its ``needs``) is off:
    it would be accepted and do nothing."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for f in dataclasses.fields(config):
        needed, values = f.metadata["needs"], f.metadata["needs_one_of"]
        if not needed or getattr(config, f.name) == defaults[f.name]:
            continue
        active = getattr(config, needed) in values if values else getattr(config, needed) != defaults[needed]
        if not active:
            wanted = f" {' or '.join(map(str, values))}" if values else ""
            raise UserError(f"{flag(f.name)} needs {flag(needed)}{wanted} (it has no effect without it)")


def check_finite_floats(config: Any) -> None:
    """NaN or infinity in any number option is refused up front (it would surface as "the loss is nan")."""
    for name, kind in field_types(type(config)).items():
        if kind is float:
            require(config, name, math.isfinite(getattr(config, name)), "a finite number")


def field_types(cls: type) -> dict[str, Any]:
    """Resolved type of every field of a config dataclass."""
    return typing.get_type_hints(cls)


def _check_value(cls: type, key: str, value: Any, source: str) -> Any:
    """Check one YAML value against the field's type; return it converted."""
    kind = field_types(cls)[key]
    where = f"{source}: key '{key}'"
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value is False and "no" in choices:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in choices:
            raise UserError(f"{where}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if kind is float:
        return _float_value(value, where)
    if typing.get_origin(kind) is list:  # a repeatable option: a list of strings, or one string
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise UserError(f"{where}: expected a string or a list of strings, got {value!r}")
        return items
    if kind is str and value is None:
        return ""
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise UserError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _float_value(value: Any, where: str) -> float:
    """A YAML number (YAML 1.1 reads 2e-5, without a dot, as a string); finite."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UserError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"{where}: expected a finite number, got {value!r}")
    return number


def _unknown_key(path: str, key: Any, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(str(key).replace("-", "_"), valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"{path}: unknown key '{key}'{hint}; valid keys: {', '.join(valid)}")


def read_yaml(cls: type, path: str) -> dict[str, Any]:
    """Read a stage's YAML config file; unknown keys and wrong types are errors."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of option names to values")
    valid = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            raise _unknown_key(path, key, valid)
        values[name] = _check_value(cls, name, value, path)
    return values


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field; absent flags stay absent so YAML values survive."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file of options (flags override it)")
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        kind = types[f.name]
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f"{f.metadata['help']} (default: {default!r})"
        common = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), **common)
        elif typing.get_origin(kind) is list:  # repeatable: --model A --model B
            parser.add_argument(flag, action="append", metavar=f.name.split("_")[-1].upper(), **common)
        else:
            parser.add_argument(flag, type=kind, metavar=f.name.split("_")[-1].upper(), **common)


def resolve(cls: type, args: argparse.Namespace) -> Any:
    """Defaults < YAML file < flags, then the stage's own validation."""
    values = read_yaml(cls, args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    config = cls(**values)
    config.validate()
    return config


def save(config: Any, path: Path) -> None:
    """Write the resolved config as YAML (reloadable with ``--config``)."""
    path.write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
