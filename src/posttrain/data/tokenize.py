"""Turn rows into token ids plus a completion mask (1 = the loss is taken on this token).

Conversations are rendered with the tokenizer's chat template and split, as text, into
prompt and assistant segments; each segment is tokenized on its own, so the prompt tokens
are exactly the ones the model sees at inference (``add_generation_prompt=True``).

The end-of-sequence token is always part of the completion and of its mask, even when the
pad token equals EOS: masks come from here, never from comparing ids with ``pad_token_id``
(the collator bug that keeps models from learning to stop).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import datasets
from transformers import PreTrainedTokenizerBase

from posttrain.data.formats import DataFormat
from posttrain.errors import UserError

log = logging.getLogger(__name__)

Segments = list[tuple[str, bool]]  # (text, is_completion) in order


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` (no tokenization)."""
    if tokenizer.chat_template is None:
        raise UserError("conversational data needs a tokenizer with a chat template, and this one has none")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


@contextlib.contextmanager
def row_context(source: str, index: int) -> Iterator[None]:
    """Prefix the file and the row (1-based) to a UserError raised while tokenizing row ``index``.

    Errors from the chat template are found row by row inside ``datasets.map``, where the
    functions that raise them know neither.
    """
    try:
        yield
    except UserError as err:
        raise UserError(f"{source}: row {index + 1}: {err}") from err


def tokenize_segments(tokenizer: PreTrainedTokenizerBase, segments: Segments, add_special: bool) -> dict[str, list]:
    """Tokenize each segment alone and concatenate; the mask marks completion segments.

    ``add_special`` adds the tokenizer's own special tokens (BOS) to the first segment,
    for plain text; chat templates write their special tokens themselves.
    """
    input_ids: list[int] = []
    mask: list[int] = []
    for i, (text, is_completion) in enumerate(segments):
        ids = tokenizer(text, add_special_tokens=add_special and i == 0)["input_ids"]
        input_ids += ids
        mask += [int(is_completion)] * len(ids)
    return {"input_ids": input_ids, "completion_mask": mask}


def ensure_eos(example: dict[str, list], eos_id: int) -> dict[str, list]:
    """Append EOS (inside the mask) unless the last completion token run already holds it."""
    ids, mask = example["input_ids"], example["completion_mask"]
    last = max(i for i, m in enumerate(mask) if m) if any(mask) else len(ids) - 1
    first = last
    while first > 0 and mask[first - 1] == mask[last]:
        first -= 1
    if eos_id in ids[first : last + 1]:
        return example
    insert = last + 1
    return {
        "input_ids": ids[:insert] + [eos_id] + ids[insert:],
        "completion_mask": mask[:insert] + [mask[last]] + mask[insert:],
    }


def split_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], prompt_turns: int | None) -> Segments:
    """Split a rendered conversation into (text, is_completion) segments.

    With ``prompt_turns`` set, everything after the first ``prompt_turns`` messages is the
    completion (prompt-completion data); otherwise every assistant turn is (messages data).
    """
    full = render_chat(tokenizer, messages, generation_prompt=False)
    starts = range(len(messages)) if prompt_turns is None else [prompt_turns]
    bounds = []  # (start, end) character spans of completion text
    for i in starts:
        if prompt_turns is None and messages[i]["role"] != "assistant":
            continue
        prefix = render_chat(tokenizer, messages[:i], generation_prompt=True)
        through = full if prompt_turns is not None else render_chat(tokenizer, messages[: i + 1], False)
        if not (full.startswith(prefix) and full.startswith(through)):
            raise UserError(
                "the chat template renders earlier turns differently once later turns follow, "
                "so prompt and completion tokens cannot be separated; use a prefix-consistent template"
            )
        bounds.append((len(prefix), len(through)))
    segments: Segments = []
    cursor = 0
    for start, end in bounds:
        segments += [(full[cursor:start], False), (full[start:end], True)]
        cursor = end
    segments.append((full[cursor:], False))
    return [(text, flag) for text, flag in segments if text]


def tokenize_row(row: dict[str, Any], fmt: DataFormat, tokenizer: PreTrainedTokenizerBase) -> dict[str, list]:
    """Token ids and completion mask for one language-modelling or prompt-completion row."""
    if fmt.name == "prompt_completion" and fmt.conversational:
        messages = row["prompt"] + row["completion"]
        segments = split_conversation(tokenizer, messages, prompt_turns=len(row["prompt"]))
        return ensure_eos(tokenize_segments(tokenizer, segments, add_special=False), tokenizer.eos_token_id)
    if fmt.name == "prompt_completion":
        segments = [(row["prompt"], False), (row["completion"], True)]
        return ensure_eos(tokenize_segments(tokenizer, segments, add_special=True), tokenizer.eos_token_id)
    if fmt.conversational:  # language modelling on messages: loss on assistant turns
        segments = split_conversation(tokenizer, row["messages"], prompt_turns=None)
        return ensure_eos(tokenize_segments(tokenizer, segments, add_special=False), tokenizer.eos_token_id)
    segments = [(row["text"], True)]
    return ensure_eos(tokenize_segments(tokenizer, segments, add_special=True), tokenizer.eos_token_id)


def tokenize_dataset(
    dataset: datasets.Dataset,
    fmt: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: str,
    completion_only_loss: bool,
    source: str,
) -> datasets.Dataset:
    """Tokenize every row (cached Arrow, memory-mapped), then truncate or drop long ones."""

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        with row_context(source, index):
            example = tokenize_row(row, fmt, tokenizer)
        if not completion_only_loss:
            example["completion_mask"] = [1] * len(example["input_ids"])
        example["length"] = len(example["input_ids"])
        return example

    rows = dataset.select_columns(list(fmt.columns))  # only these: another named like an output ("length") clashes
    tokenized = rows.map(encode, with_indices=True, remove_columns=rows.column_names, desc="tokenizing")
    too_long = sum(1 for n in tokenized["length"] if n > max_length)
    if too_long and truncation == "drop":
        tokenized = tokenized.filter(lambda n: n <= max_length, input_columns="length")
        log.warning(
            "%s: dropped %d of %d examples longer than max_length=%d", source, too_long, len(dataset), max_length
        )
    elif too_long:
        tokenized = tokenized.map(lambda e: _truncate(e, max_length), desc="truncating")
        log.warning("%s: truncated %d of %d examples to max_length=%d", source, too_long, len(dataset), max_length)
    return _drop_without_targets(tokenized, source)


def _truncate(example: dict[str, Any], max_length: int) -> dict[str, Any]:
    return {
        "input_ids": example["input_ids"][:max_length],
        "completion_mask": example["completion_mask"][:max_length],
        "length": min(example["length"], max_length),
    }


def _drop_without_targets(tokenized: datasets.Dataset, source: str) -> datasets.Dataset:
    """Rows whose completion was cut off entirely teach nothing; drop them, say so, refuse if none are left."""
    kept = tokenized.filter(lambda mask: any(mask[1:]), input_columns="completion_mask")
    if len(kept) < len(tokenized):
        log.warning(
            "%s: dropped %d examples with no completion token left after truncation", source, len(tokenized) - len(kept)
        )
    if len(kept) == 0:
        raise UserError(f"{source}: no example has a completion token within max_length; raise --max-length")
    return kept
