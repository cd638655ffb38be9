"""Load a dataset with Hugging Face ``datasets``: local files are memory-mapped Arrow, not lists in RAM."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
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
        with _no_progress_bars():
            return datasets.load_dataset(builder, data_files=str(path), split="train")
    except (DatasetGenerationError, ValueError) as err:  # ValueError: datasets' JSON parser, unwrapped
        if path.suffix == ".jsonl":
            _check_json_lines(path)
        cause = err.__cause__ or err
        raise UserError(f"{path}: cannot be read as {path.suffix[1:]}: {_first_line(cause)}") from err


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide datasets' "Generating train split" bar, so that an error is the only line on stderr."""
    if datasets.utils.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def _check_json_lines(path: Path) -> None:
    """Raise a UserError naming the first line of a JSON Lines file that is not a JSON object."""
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as err:
                raise UserError(f"{path}: line {number}: not valid JSON: {err.msg} (column {err.colno})") from err
            if not isinstance(value, dict):
                raise UserError(f"{path}: line {number}: expected a JSON object {{...}}, got {type(value).__name__}")


def _load_hub(source: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(source, split=split)
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as err:
        offline = " (HF_HUB_OFFLINE is set)" if datasets.config.HF_HUB_OFFLINE else ""
        raise UserError(
            f"{source}: not a local file and not loadable from the hub{offline}: {_first_line(err)}"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]
