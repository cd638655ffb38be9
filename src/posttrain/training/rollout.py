"""Rollouts for the RL stages: tokenized prompts, batched sampling with the KV cache, and
per-token log-probs of the sampled responses.

Layout of a rollout of N sequences (the one ``generate`` returns):
  sequences (N, P + R): prompts left-padded to P tokens, then responses right-padded to R
  attention (N, P + R): 1 on real prompt tokens and on response tokens up to the first EOS
  response_mask (N, R): 1 on response tokens up to and including the first EOS
Position ids count real tokens only (``attention.cumsum - 1``), as during generation, so
a scoring forward sees exactly the positions the sampler saw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from posttrain.data.formats import DataFormat, validate_rows
from posttrain.data.tokenize import render_chat, row_context
from posttrain.errors import UserError
from posttrain.ops.logprobs import token_log_probs


def tokenize_prompts(rows: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int, source: str):
    """Prompt ids of every row (chat template with the generation prompt for message lists).

    Any format with a ``prompt`` column works (prompt-only, prompt-completion, preference);
    prompts are cut to their last ``max_length`` tokens. Every prompt must give at least one
    token: sampling continues from the prompt's last one.
    """
    if "prompt" not in rows.column_names:
        raise UserError(f"{source}: the RL stages need a 'prompt' column; columns are {rows.column_names}")
    prompts = rows.select_columns(["prompt"])
    conversational = isinstance(prompts[0]["prompt"], list)  # the prompt's own kind, whatever the other columns
    validate_rows(prompts, DataFormat("prompt_only", ("prompt",), conversational), source)

    def encode(row: dict[str, Any], index: int) -> dict[str, Any]:
        if conversational:
            with row_context(source, index):
                text = render_chat(tokenizer, row["prompt"], generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(row["prompt"])["input_ids"]
        ids = ids[-max_length:]
        return {"prompt_ids": ids, "length": len(ids)}

    tokenized = prompts.map(encode, with_indices=True, desc="tokenizing prompts")
    empty = next((i for i, n in enumerate(tokenized["length"]) if n == 0), None)
    if empty is not None:
        raise UserError(f"{source}: row {empty + 1}: column 'prompt': has no tokens (the tokenizer drops all of it)")
    return tokenized


@dataclass
class Rollout:
    sequences: torch.Tensor  # (N, P + R)
    attention: torch.Tensor  # (N, P + R)
    response_mask: torch.Tensor  # (N, R)
    prompt_length: int  # P
    ended: torch.Tensor  # (N,) bool: the response emitted EOS

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]  # (N, R)

    def positions(self) -> torch.Tensor:
        return (self.attention.cumsum(-1) - 1).clamp(min=0)  # (N, P + R)

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> Rollout:
        """The rollout rows of an experience micro-batch (which stores the prompt length per sample)."""
        return cls(batch["sequences"], batch["attention"], batch["response_mask"],
                   int(batch["prompt_length"][0]), batch["ended"])  # fmt: skip

    def select(self, index: torch.Tensor) -> Rollout:
        return Rollout(self.sequences[index], self.attention[index], self.response_mask[index],
                       self.prompt_length, self.ended[index])  # fmt: skip


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and attention mask, (N, P) each, for batched generation."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.tensor(prompt)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


def response_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1 up to and including the first EOS of each row, and whether the row has one. ((N, R), (N,))"""
    is_eos = responses == eos_id
    before = is_eos.long().cumsum(-1) - is_eos.long()  # EOS tokens strictly before each position
    return (before == 0).long(), is_eos.any(-1)


@torch.no_grad()
def sample(model, prompts: list[list[int]], tokenizer: PreTrainedTokenizerBase, config) -> Rollout:
    """Sample one response per prompt, batched, with the KV cache; stop at EOS or ``max_new_tokens``.

    ``config.temperature`` 0 decodes greedily (evaluation); the RL stages always sample.
    """
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    ids, mask = ids.to(model.device), mask.to(model.device)
    sampling = {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": 0}  # top-p alone
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        **(sampling if config.temperature > 0 else {"do_sample": False}),
        max_new_tokens=config.max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    responses = out[:, ids.shape[1] :]
    resp_mask, ended = response_mask(responses, tokenizer.eos_token_id)
    return Rollout(out, torch.cat([mask, resp_mask], dim=1), resp_mask, ids.shape[1], ended)


def response_window(rollout: Rollout) -> int:
    """Positions whose logits a response needs: the last prompt token's and every response token's
    (the last one's is dropped after the LM head). Passed as ``logits_to_keep``, it spares the LM head
    (2·hidden·vocab FLOPs a position) the P − 1 prompt positions that predict nothing sampled."""
    return rollout.sequences.shape[1] - rollout.prompt_length + 1  # R + 1


def response_logits(model, rollout: Rollout) -> torch.Tensor:
    """Logits that predict each response token, (N, R, V)."""
    out = model(input_ids=rollout.sequences, attention_mask=rollout.attention, position_ids=rollout.positions(),
                use_cache=False, logits_to_keep=response_window(rollout))  # fmt: skip
    return out.logits[:, :-1]  # positions P − 1 .. P + R − 2


def response_log_probs(logits: torch.Tensor, rollout: Rollout, temperature: float) -> torch.Tensor:
    """log π(y_t) of each response token under logits / temperature (as sampled); 0 past the end. (N, R)"""
    targets = rollout.responses.masked_fill(rollout.response_mask == 0, -100)
    return token_log_probs(logits / temperature, targets)


@torch.no_grad()
def batched_log_probs(model, rollout: Rollout, temperature: float, batch_size: int) -> torch.Tensor:
    """``response_log_probs`` over the rollout in chunks of ``batch_size`` rows (no gradient). (N, R)"""
    parts = []
    for start in range(0, len(rollout.sequences), batch_size):
        part = rollout.select(torch.arange(start, min(start + batch_size, len(rollout.sequences))))
        parts.append(response_log_probs(response_logits(model, part), part, temperature))
    return torch.cat(parts)


@torch.no_grad()
def group_log_probs(model, rollout: Rollout, group_size: int, temperature: float, batch_size: int) -> torch.Tensor:
    """``batched_log_probs`` of a rollout whose rows come in groups of ``group_size`` with one prompt
    (GRPO's k completions, group-major): each prompt runs once and its KV cache is repeated for the
    group's responses, so the forward covers G·P + N·R positions instead of N·(P + R). Chunks of
    whole groups of about ``batch_size`` rows. Same values as the full forward up to float rounding
    (attention over a cache sums in another order). (N, R)"""
    n, width = rollout.sequences.shape[0], rollout.prompt_length
    rows_per_chunk = max(batch_size // group_size, 1) * group_size
    positions, parts = rollout.positions(), []
    for start in range(0, n, rows_per_chunk):
        rows = torch.arange(start, min(start + rows_per_chunk, n), device=rollout.sequences.device)
        firsts = rows[::group_size]  # one row per group: its prompt is the group's
        out = model(input_ids=rollout.sequences[firsts, :width], attention_mask=rollout.attention[firsts, :width],
                    position_ids=positions[firsts, :width], use_cache=True, logits_to_keep=1)  # fmt: skip
        cache = out.cache
        cache.batch_repeat_interleave(group_size)  # (G, ...) -> (G·k, ...)
        first = out.logits.repeat_interleave(group_size, dim=0)  # (G·k, 1, V): predicts each first response token
        logits = first
        if rollout.sequences.shape[1] - width > 1:  # responses of one token need nothing more
            rest = model(
                input_ids=rollout.sequences[rows, width:-1],
                attention_mask=rollout.attention[rows, :-1],
                position_ids=positions[rows, width:-1],
                cache=cache,
                use_cache=True,
            ).logits  # (G·k, R − 1, V)
            logits = torch.cat([first, rest], dim=1)
        parts.append(response_log_probs(logits, rollout.select(rows), temperature))
    return torch.cat(parts)
