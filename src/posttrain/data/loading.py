"""Load a dataset with Hugging Face ``datasets``: local files are memory-mapped Arrow, not lists in RAM.

A file ``datasets`` cannot read is examined again, by posttrain, to name what is wrong
(the line and column of a non-UTF-8 byte or of broken JSON, a file without rows): the
library's own errors name neither, and some (an empty file) are not even errors it expects.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
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
    _check_names(dataset, source)
    return dataset


def _check_names(dataset: datasets.Dataset, source: str) -> None:
    """Refuse NUL characters in column and field names.

    Arrow cuts such a name at the NUL, and datasets then fails to decode every row holding
    the field, with a KeyError deep inside its formatting code.
    """
    for name in _field_names(dataset.features):
        if "\x00" in name:
            raise UserError(f"{source}: the column or field name {name!r} holds a NUL character; rename it")


def _field_names(feature: Any) -> Iterator[str]:
    """Every column and nested field name of ``feature`` (columns are a dict, and so is each struct)."""
    if isinstance(feature, dict):
        for name, inner in feature.items():
            yield name
            yield from _field_names(inner)
    elif isinstance(feature, (datasets.List, datasets.LargeList)):
        yield from _field_names(feature.feature)


def _load_file(path: Path) -> datasets.Dataset:
    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise UserError(f"{path}: unsupported file type '{path.suffix}'; use one of {', '.join(BUILDERS)}")
    if path.stat().st_size == 0:  # datasets' JSON reader ends an empty file with a bare StopIteration
        raise UserError(f"{path}: the dataset has no rows (the file is empty)")
    try:
        with _quiet():
            dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
        dataset.data.table.validate(full=True)  # pyarrow's JSON reader lets non-UTF-8 bytes into strings
    # ValueError: datasets' JSON and CSV parsers, unwrapped; ArrowException: pyarrow's type errors;
    # KeyError: datasets' schema cast, on column names it cannot look up (an empty one beside a NUL one)
    except (DatasetGenerationError, ValueError, KeyError, pa.ArrowException) as err:
        _diagnose(path)
        cause = err.__cause__ or err
        raise UserError(f"{path}: cannot be read as {path.suffix[1:]}: {_first_line(cause)}") from err
    return dataset


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide datasets' "Generating train split" bar, its logged errors and library warnings while loading.

    A file that cannot be read ends with one UserError line; datasets would print the same
    failure before it ("Failed to read file ..."), once through its own handler and once
    through the root logger's.
    """
    logger = logging.getLogger("datasets")
    level = logger.level
    bars_were_on = not datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def _diagnose(path: Path) -> None:
    """Raise a UserError naming what is wrong with a file datasets could not read, when posttrain can tell."""
    if path.suffix == ".parquet":
        _check_parquet(path)
        return
    _check_text(path)
    if path.suffix == ".json" and _first_character(path) == "[":
        _check_json(path)
    elif path.suffix in (".jsonl", ".json"):  # datasets reads a .json file that is no list as JSON Lines
        _check_json_lines(path)


def _check_parquet(path: Path) -> None:
    try:
        rows = pq.ParquetFile(path).metadata.num_rows
    except pa.ArrowException as err:  # not a parquet file at all: say so, not what datasets tried next
        raise UserError(f"{path}: cannot be read as parquet: {_first_line(err)}") from err
    if rows == 0:
        raise UserError(f"{path}: the dataset has no rows")


def _check_text(path: Path) -> None:
    """UTF-8 everywhere (else name the line and column), and at least one row besides a CSV header."""
    lines_with_text = 0
    with path.open("rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                column = len(raw[: err.start].decode("utf-8")) + 1
                byte = raw[err.start : err.start + 1].hex()
                raise UserError(
                    f"{path}: line {number}: column {column}: not valid UTF-8 (byte 0x{byte}); save the file as UTF-8"
                ) from err
            lines_with_text += bool(line.strip())
    if lines_with_text == 0 or (path.suffix == ".csv" and lines_with_text == 1):
        what = "a header" if lines_with_text else "only whitespace"
        raise UserError(f"{path}: the dataset has no rows (the file holds {what})")


def _check_json_lines(path: Path) -> None:
    """Raise a UserError naming the first line of a JSON Lines file that is not a JSON object."""
    columns: set[str] = set()
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
            columns.update(value)
    if not columns:
        raise UserError(f"{path}: the dataset has no columns: every line is an empty object {{}}")


def _first_character(path: Path) -> str:
    """The first character that is not whitespace, or "" for a file of whitespace."""
    with path.open(encoding="utf-8") as file:
        for line in file:
            if line.strip():
                return line.strip()[0]
    return ""


def _check_json(path: Path) -> None:
    """A .json file is one JSON value: a list of row objects (or of strings, read as ``text``)."""
    with path.open(encoding="utf-8") as file:
        try:
            value = json.load(file)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: line {err.lineno}: not valid JSON: {err.msg} (column {err.colno})") from err
    if value in ([], {}):
        raise UserError(f"{path}: the dataset has no rows")


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
