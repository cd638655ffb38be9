"""Preference data: prompt, chosen and rejected token ids, and batches that hold both answers.

Each answer is tokenized exactly as SFT tokenizes a prompt-completion row (chat template for
conversations, EOS always in the completion), so the log-prob of an answer is the sum over
its completion tokens only. A batch of B pairs is one tensor of 2B rows, chosen first then
rejected, so both go through the model in one forward pass.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.collate import pad_batch
from posttrain.data.formats import DataFormat, split_implicit_prompt
from posttrain.data.tokenize import row_context, tokenize_row
from posttrain.errors import UserError

log = logging.getLogger(__name__)

PROMPT_COMPLETION = {True: DataFormat("prompt_completion", ("prompt", "completion"), True),
                     False: DataFormat("prompt_completion", ("prompt", "completion"), False)}  # fmt: skip


def prompt_and_answer(prompt: Any, answer: Any, conversational: bool, tokenizer) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids (answer ends with EOS), split where the completion mask starts."""
    example = tokenize_row({"prompt": prompt, "completion": answer}, PROMPT_COMPLETION[conversational], tokenizer)
    start = example["completion_mask"].index(1)
    return example["input_ids"][:start], example["input_ids"][start:]


def encode_pair(row: dict[str, Any], fmt: DataFormat, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    if "prompt" in fmt.columns:
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
    prompt_ids, chosen_ids = prompt_and_answer(prompt, chosen, fmt.conversational, tokenizer)
    _, rejected_ids = prompt_and_answer(prompt, rejected, fmt.conversational, tokenizer)
    longest = max(len(chosen_ids), len(rejected_ids))
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids,
            "prompt_length": len(prompt_ids), "length": len(prompt_ids) + longest}  # fmt: skip


def encode_unpaired(row: dict[str, Any], fmt: DataFormat, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    prompt_ids, completion_ids = prompt_and_answer(row["prompt"], row["completion"], fmt.conversational, tokenizer)
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": row["label"],
            "prompt_length": len(prompt_ids), "length": len(prompt_ids) + len(completion_ids)}  # fmt: skip


ANSWERS = {"preference": ("chosen_ids", "rejected_ids"), "unpaired_preference": ("completion_ids",)}
ENCODERS = {"preference": encode_pair, "unpaired_preference": encode_unpaired}


def tokenize_preferences(
    dataset: datasets.Dataset,
    fmt: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    truncation: str,
    source: str,
) -> datasets.Dataset:
    """Tokenize paired or unpaired preference rows; skip identical pairs; fit ``max_length``."""
    encoder = ENCODERS[fmt.name]

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        with row_context(source, index):
            return {**encoder(row, fmt, tokenizer), "row": index + 1}  # 1-based, for messages

    rows = dataset.select_columns(list(fmt.columns))  # only these: another named like an output ("length") clashes
    tokenized = rows.map(encode, with_indices=True, remove_columns=rows.column_names, desc="tokenizing")
    if fmt.name == "preference":
        tokenized = _skip_identical(tokenized, source)
    return _fit_length(tokenized, ANSWERS[fmt.name], max_length, truncation, source)


def _skip_identical(tokenized: datasets.Dataset, source: str) -> datasets.Dataset:
    """A pair whose answers are the same teaches nothing (Δ ≡ 0); warn, count and skip it."""
    kept = tokenized.filter(lambda c, r: c != r, input_columns=["chosen_ids", "rejected_ids"])
    if len(kept) < len(tokenized):
        log.warning("%s: skipped %d pairs whose chosen and rejected answers are identical",
                    source, len(tokenized) - len(kept))  # fmt: skip
    if len(kept) == 0:
        raise UserError(f"{source}: every pair has identical chosen and rejected answers")
    return kept


def _fit_length(tokenized, answers: tuple[str, ...], max_length: int, truncation: str, source: str):
    """Truncate answers (never the prompt) or drop rows over ``max_length``; a prompt that fills it is an error."""
    full = [i for i, n in enumerate(tokenized["prompt_length"]) if n >= max_length]
    if full and truncation == "truncate":
        prompt, row = tokenized[full[0]]["prompt_length"], tokenized[full[0]]["row"]
        raise UserError(
            f"{source}: row {row}: the prompt has {prompt} tokens and fills --max-length {max_length}; "
            f"raise --max-length, or pass --truncation drop to skip such examples ({len(full)} in all)"
        )
    too_long = sum(1 for n in tokenized["length"] if n > max_length)
    if too_long and truncation == "drop":
        tokenized = tokenized.filter(lambda n: n <= max_length, input_columns="length")
        log.warning(
            "%s: dropped %d of %d examples longer than max_length=%d",
            source,
            too_long,
            too_long + len(tokenized),
            max_length,
        )
    elif too_long:
        tokenized = tokenized.map(lambda e: _truncate_answers(e, answers, max_length), desc="truncating")
        log.warning("%s: truncated the answers of %d examples to fit max_length=%d", source, too_long, max_length)
    if len(tokenized) == 0:
        raise UserError(f"{source}: no example fits --max-length {max_length}")
    return tokenized


def _truncate_answers(example: dict[str, Any], answers: tuple[str, ...], max_length: int) -> dict[str, Any]:
    room = max_length - len(example["prompt_ids"])
    cut = {name: example[name][:room] for name in answers}
    return {**cut, "length": len(example["prompt_ids"]) + max(len(ids) for ids in cut.values())}


def sequences(rows: dict[str, list], answer_column: str) -> dict[str, list]:
    """Prompt + answer rows with their completion masks, for ``pad_batch``."""
    pairs = list(zip(rows["prompt_ids"], rows[answer_column], strict=True))
    return {
        "input_ids": [p + a for p, a in pairs],
        "completion_mask": [[0] * len(p) + [1] * len(a) for p, a in pairs],
    }


def collate_pairs(rows: dict[str, list], pad_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> 2B padded rows (chosen rows 0..B-1, rejected rows B..2B-1); one target per pair."""
    chosen, rejected = sequences(rows, "chosen_ids"), sequences(rows, "rejected_ids")
    batch = pad_batch({k: chosen[k] + rejected[k] for k in chosen}, pad_id)
    batch["n_targets"] = torch.tensor(len(rows["chosen_ids"]))  # the loss is normalised per pair
    return _with_cached_reference(batch, rows)


def collate_unpaired(rows: dict[str, list], pad_id: int) -> dict[str, torch.Tensor]:
    """B labelled completions -> B padded rows, their labels, one target per example."""
    batch = pad_batch(sequences(rows, "completion_ids"), pad_id)
    batch["desirable"] = torch.tensor(rows["label"], dtype=torch.bool)
    batch["n_targets"] = torch.tensor(len(rows["label"]))
    return _with_cached_reference(batch, rows)


def _with_cached_reference(batch: dict[str, torch.Tensor], rows: dict[str, list]) -> dict[str, torch.Tensor]:
    """Precomputed reference log-probs (one per answer of each example) in the batch's row order."""
    if "ref_logps" in rows:
        per_example = torch.tensor(rows["ref_logps"], dtype=torch.float32)  # (B, answers)
        batch["ref_logps"] = per_example.T.flatten()  # (answers * B,): all chosen, then all rejected
    return batch
