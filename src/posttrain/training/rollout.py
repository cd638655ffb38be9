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


def shared_prompt_mask(prompt_attention: torch.Tensor, response_attention: torch.Tensor) -> torch.Tensor:
    """Which keys each query may attend to in a row packing one prompt and its k responses,
    ``[prompt | response 1 | ... | response k]``: a response sees the prompt's real tokens and its
    own earlier tokens, never another response; the prompt is causal. Every query also sees itself,
    so the padded ones do not give NaN (their outputs are never used).
    prompt_attention: (G, P), response_attention: (G, k, R) -> (G, 1, L, L) bool, L = P + k·R
    """
    k, r = response_attention.shape[1:]
    p = prompt_attention.shape[1]
    length = p + k * r
    segment = torch.cat([torch.zeros(p, dtype=torch.long), torch.arange(1, k + 1).repeat_interleave(r)])  # (L,)
    order = torch.arange(length)
    causal = order[None, :] <= order[:, None]  # (L, L): key at or before query
    visible = (segment[None, :] == 0) | (segment[None, :] == segment[:, None])  # key in the prompt or the same response
    keys = torch.cat([prompt_attention, response_attention.flatten(1)], dim=1).bool().cpu()  # (G, L)
    mask = (causal & visible)[None] & keys[:, None, :]  # (G, L, L)
    return (mask | torch.eye(length, dtype=torch.bool))[:, None].to(prompt_attention.device)


def group_response_logits(model, rollout: Rollout, group_size: int) -> torch.Tensor:
    """``response_logits`` for rows in groups of ``group_size`` that share one prompt (group-major: GRPO's
    k completions): each group is one packed row ``[prompt | response 1 | ... | response k]`` under
    ``shared_prompt_mask``, with every token at the position id it has in its own row, so the prompt
    runs once per group instead of k times (G·P + N·R positions instead of N·(P + R)). The same
    logits as the full forward up to float rounding, with gradients. (N, R, V)"""
    n, width = rollout.sequences.shape
    p, k = rollout.prompt_length, group_size
    r, groups = width - p, n // k

    def pack(rows: torch.Tensor) -> torch.Tensor:  # (N, P + R) -> (G, P + k·R)
        rows = rows.view(groups, k, width)
        return torch.cat([rows[:, 0, :p], rows[:, :, p:].flatten(1)], dim=1)

    attention = rollout.attention.view(groups, k, width)
    allowed = shared_prompt_mask(attention[:, 0, :p], attention[:, :, p:])
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    logits = model(
        input_ids=pack(rollout.sequences),
        attention_mask=mask,
        position_ids=pack(rollout.positions()),
        use_cache=False,
        logits_to_keep=k * r + 1,
    ).logits  # (G, 1 + k·R, V): from position P − 1 on
    # response j's token t is predicted at P − 1 (t = 0: the prompt's last token) or at P + j·R + t − 1
    before = torch.arange(k * r, device=logits.device).view(k, r)
    before[:, 0] = 0
    return logits[:, before.flatten()].view(n, r, -1)


@torch.no_grad()
def group_log_probs(model, rollout: Rollout, group_size: int, temperature: float, batch_size: int) -> torch.Tensor:
    """``batched_log_probs`` through ``group_response_logits``, in chunks of whole groups of about
    ``batch_size`` rows. (N, R)"""
    n = rollout.sequences.shape[0]
    rows_per_chunk = max(batch_size // group_size, 1) * group_size
    parts = []
    for start in range(0, n, rows_per_chunk):
        part = rollout.select(torch.arange(start, min(start + rows_per_chunk, n), device=rollout.sequences.device))
        parts.append(response_log_probs(group_response_logits(model, part, group_size), part, temperature))
    return torch.cat(parts)
