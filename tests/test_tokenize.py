"""Masks and labels on hand-worked examples, with a word-level tokenizer whose ids we know."""

from __future__ import annotations

import datasets
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from posttrain.data.collate import IGNORE_INDEX, pack_bins, pack_dataset, pad_batch
from posttrain.data.formats import DataFormat
from posttrain.data.tokenize import ensure_eos, tokenize_dataset, tokenize_row
from posttrain.models.factory import CHATML_TEMPLATE

VOCAB = [
    "<|im_end|>",
    "<|pad|>",
    "<|im_start|>",
    "user",
    "assistant",
    "system",
    "say",
    "hello",
    "hi",
    "there",
    "be",
    "nice",
]
ID = {w: i for i, w in enumerate(VOCAB)}
EOS, PAD, START = ID["<|im_end|>"], ID["<|pad|>"], ID["<|im_start|>"]


def word_tokenizer(pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(vocab=ID, unk_token="<|pad|>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>" if pad_is_eos else "<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
    )


STANDARD = DataFormat("prompt_completion", ("prompt", "completion"), conversational=False)
CHAT_PC = DataFormat("prompt_completion", ("prompt", "completion"), conversational=True)
MESSAGES = DataFormat("language_modeling", ("messages",), conversational=True)
TEXT = DataFormat("language_modeling", ("text",), conversational=False)


def test_standard_prompt_completion_masks_completion_and_eos():
    example = tokenize_row({"prompt": "say hello", "completion": " hi there"}, STANDARD, word_tokenizer())
    assert example["input_ids"] == [ID["say"], ID["hello"], ID["hi"], ID["there"], EOS]
    assert example["completion_mask"] == [0, 0, 1, 1, 1]


def test_conversational_prompt_completion_uses_template_and_keeps_its_eos():
    row = {"prompt": [{"role": "user", "content": "say hello"}], "completion": [{"role": "assistant", "content": "hi"}]}
    example = tokenize_row(row, CHAT_PC, word_tokenizer())
    # <|im_start|>user\nsay hello<|im_end|>\n<|im_start|>assistant\n | hi<|im_end|>\n
    prompt = [START, ID["user"], ID["say"], ID["hello"], EOS, START, ID["assistant"]]
    assert example["input_ids"] == [*prompt, ID["hi"], EOS]
    assert example["completion_mask"] == [0] * 7 + [1, 1]


def test_messages_mask_every_assistant_turn_and_nothing_else():
    messages = [
        {"role": "system", "content": "be nice"},
        {"role": "user", "content": "say hi"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "say hello"},
        {"role": "assistant", "content": "hello there"},
    ]
    example = tokenize_row({"messages": messages}, MESSAGES, word_tokenizer())
    expected = [
        (START, 0), (ID["system"], 0), (ID["be"], 0), (ID["nice"], 0), (EOS, 0),
        (START, 0), (ID["user"], 0), (ID["say"], 0), (ID["hi"], 0), (EOS, 0),
        (START, 0), (ID["assistant"], 0), (ID["hi"], 1), (EOS, 1),
        (START, 0), (ID["user"], 0), (ID["say"], 0), (ID["hello"], 0), (EOS, 0),
        (START, 0), (ID["assistant"], 0), (ID["hello"], 1), (ID["there"], 1), (EOS, 1),
    ]  # fmt: skip
    assert list(zip(example["input_ids"], example["completion_mask"], strict=True)) == expected


def test_text_rows_train_on_every_token_and_end_with_eos():
    example = tokenize_row({"text": "hello there"}, TEXT, word_tokenizer())
    assert example == {"input_ids": [ID["hello"], ID["there"], EOS], "completion_mask": [1, 1, 1]}


def test_ensure_eos_appends_inside_the_mask_only_when_missing():
    assert ensure_eos({"input_ids": [6, 8], "completion_mask": [0, 1]}, EOS) == {
        "input_ids": [6, 8, EOS],
        "completion_mask": [0, 1, 1],
    }
    kept = {"input_ids": [6, 8, EOS, 3], "completion_mask": [0, 1, 1, 0]}
    assert ensure_eos(kept, EOS) == kept
    # EOS in the prompt does not count: the completion run must hold it
    assert ensure_eos({"input_ids": [EOS, 8, 3], "completion_mask": [0, 1, 0]}, EOS)["input_ids"] == [EOS, 8, EOS, 3]


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_labels_keep_the_real_eos_even_when_pad_equals_eos(pad_is_eos):
    tokenizer = word_tokenizer(pad_is_eos=pad_is_eos)
    short = tokenize_row({"prompt": "say hello", "completion": " hi"}, STANDARD, tokenizer)
    long = tokenize_row({"prompt": "say hello", "completion": " hi there hi there"}, STANDARD, tokenizer)
    rows = {k: [short[k], long[k]] for k in short}
    batch = pad_batch(rows, pad_id=tokenizer.pad_token_id)
    pad = tokenizer.pad_token_id
    assert batch["input_ids"][0].tolist() == [ID["say"], ID["hello"], ID["hi"], EOS, pad, pad, pad]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, ID["hi"], EOS] + [IGNORE_INDEX] * 3
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert batch["n_targets"].item() == 2 + 5  # shifted: hi, EOS | hi there hi there EOS
    assert batch["n_tokens"].item() == 4 + 7


def test_tokenize_dataset_truncates_or_drops_and_counts(caplog):
    rows = datasets.Dataset.from_list(
        [{"prompt": "say", "completion": " hi"}, {"prompt": "say hello", "completion": " hi there hi there"}]
    )
    tokenizer = word_tokenizer()
    cut = tokenize_dataset(
        rows, STANDARD, tokenizer, max_length=4, truncation="truncate", completion_only_loss=True, source="d"
    )
    assert cut["length"] == [3, 4]
    assert cut[1]["input_ids"] == [ID["say"], ID["hello"], ID["hi"], ID["there"]]
    assert "truncated 1 of 2" in caplog.text
    kept = tokenize_dataset(
        rows, STANDARD, tokenizer, max_length=4, truncation="drop", completion_only_loss=True, source="d"
    )
    assert kept["length"] == [3]
    every = tokenize_dataset(
        rows, STANDARD, tokenizer, max_length=16, truncation="drop", completion_only_loss=False, source="d"
    )
    assert every[0]["completion_mask"] == [1, 1, 1]


def test_pack_bins_best_fit_decreasing():
    # sorted by length: 0 (5), 2 (4), 1 (3), 3 (2); 1 fits only beside 2 (free 3), 3 then beside 0 (free 2)
    assert pack_bins([5, 3, 4, 2], capacity=7) == [[0, 3], [2, 1]]
    assert pack_bins([7, 7], capacity=7) == [[0], [1]]


def test_packed_rows_restart_positions_and_pad_as_their_own_block():
    tokenized = datasets.Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]],
            "completion_mask": [[0, 1, 1], [0, 1], [0, 1, 1, 1]],
            "length": [3, 2, 4],
        }
    )
    packed = pack_dataset(tokenized, max_length=5)
    assert packed["input_ids"] == [[6, 7, 8, 9], [1, 2, 3, 4, 5]]
    assert packed["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 0, 1]]
    batch = pad_batch(packed[:], pad_id=0)
    assert "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, 7, 8, 9, IGNORE_INDEX]
    assert torch.equal(batch["n_targets"], torch.tensor(3 + 3))


def test_pack_bins_chooses_the_fullest_row_that_fits():
    # rows [7] (free 3) and [4, 4] (free 2): the 1 joins the fuller row, where first fit would pick [7]
    assert pack_bins([7, 4, 4, 1], capacity=10) == [[0], [1, 2, 3]]
