"""The frozen reference model of DPO-style losses: a copy, the policy with LoRA adapters off,
or its log-probs computed once and cached on disk.

The cache is keyed by a hash of the tokenized data (every id of every prompt and answer)
and a hash of the reference's weights, so a changed dataset, tokenizer, ``max_length`` or
model can never reuse stale log-probs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.ops.logprobs import sequence_log_probs, target_logits

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


def completion_logps(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each row's completion tokens and their count. ((N,), (N,))

    Logits only from the batch's first completion position on: none over the shared prompt part.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits, labels = target_logits(model, inputs, batch["labels"])  # (N, K, V), (N, K)
    return sequence_log_probs(logits, labels)


@dataclass
class Reference:
    """A frozen model scoring completions; ``adapters_off``: the LoRA policy with its adapters disabled."""

    model: torch.nn.Module
    adapters_off: bool = False

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        off = self.model.disable_adapter() if self.adapters_off else contextlib.nullcontext()
        with off:
            return completion_logps(self.model, batch)[0]

    def fingerprint(self) -> str:
        """SHA-256 of the reference's weights (the base weights when adapters are off)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            if self.adapters_off and "lora_" in name:
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def data_fingerprint(dataset: datasets.Dataset, columns: tuple[str, ...]) -> str:
    """SHA-256 of every token id of ``columns``, row by row, in order."""
    digest = hashlib.sha256()
    for batch in dataset.select_columns(list(columns)).iter(batch_size=1024):
        for column in columns:
            for ids in batch[column]:
                digest.update(np.asarray(ids, dtype=np.int64).tobytes())
                digest.update(b"|")
    return digest.hexdigest()


def cache_path(cache_dir: str, data_hash: str, model_hash: str) -> Path:
    return Path(cache_dir).expanduser() / "ref-logps" / f"{data_hash[:24]}-{model_hash[:24]}.safetensors"


@torch.no_grad()
def precompute_logps(dataset, collate, reference: Reference, answers: int, batch_size: int, device) -> torch.Tensor:
    """Reference log-probs of every answer of every example, (N, answers), in dataset order."""
    rows = []
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate(dataset[start : start + batch_size]).items()}
        flat = reference.logps(batch).float().cpu()  # (answers * b,): answer-major
        rows.append(flat.view(answers, -1).T)
    return torch.cat(rows)


def with_reference_logps(
    dataset: datasets.Dataset,
    collate,
    reference: Reference,
    columns: tuple[str, ...],
    batch_size: int,
    cache_dir: str,
    device,
) -> datasets.Dataset:
    """``dataset`` plus a ``ref_logps`` column, read from the cache or computed once and cached."""
    answers = len(columns) - 1  # columns: prompt_ids, then one per answer
    path = cache_path(cache_dir, data_fingerprint(dataset, columns), reference.fingerprint())
    if path.is_file():
        log.info("reference log-probs: reusing %s", path)
        logps = load_file(path)["logps"]
    else:
        logps = precompute_logps(dataset, collate, reference, answers, batch_size, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"logps": logps.contiguous()}, tmp)
        tmp.rename(path)  # atomic: a half-written cache is never read
        log.info("reference log-probs: computed and cached in %s", path)
    return dataset.add_column("ref_logps", logps.tolist())
