"""Load a dataset with Hugging Face ``datasets``: local files are memory-mapped Arrow, not lists in RAM."""

from __future__ import annotations

from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from posttrain.errors import UserError

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def looks_like_path(source: str) -> bool:
    """A data-file extension, an explicit directory prefix or more than one ``/`` marks a local path.

    Anything else (``org/name``) may be a hub id; hub ids can contain dots (``Qwen2.5``).
    """
    return Path(source).suffix in BUILDERS or source.startswith((".", "/", "~")) or source.count("/") > 1


def load_rows(source: str, split: str = "train") -> datasets.Dataset:
    """Load ``source`` (a .jsonl/.json/.parquet/.csv file or a hub id) as one split."""
    path = Path(source).expanduser()
    if path.is_file():
        dataset = _load_file(path)
    elif looks_like_path(source):
        raise UserError(f"{source}: file not found")
    else:
        dataset = _load_hub(source, split)
    if len(dataset) == 0:
        raise UserError(f"{source}: the dataset has no rows")
    return dataset


def _load_file(path: Path) -> datasets.Dataset:
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(BUILDERS)}")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except DatasetGenerationError as err:
        cause = err.__cause__ or err
        raise UserError(f"{path}: cannot be read as {path.suffix[1:]}: {_first_line(cause)}") from err


def _load_hub(source: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        offline = " (the hub cannot be reached: offline?)" if datasets.config.HF_HUB_OFFLINE else ""
        raise UserError(
            f"{source}: not a local file and not loadable from the hub{offline}: {_first_line(err)}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
