"""The GRPO family's variants: each formula by hand, accumulation against one big batch, the
default path against the computation it replaced, tiny runs, and the options refused."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import WORDS, write_jsonl
from posttrain.cli import main
from posttrain.ops import rl
from posttrain.ops.grpo_losses import (
    LOSS_TYPES,
    batch_scaled_advantages,
    clip_higher_token_loss,
    overlong_penalty,
    sequence_log_ratio,
    token_log_ratio,
)
from posttrain.stages import grpo
from posttrain.stages.grpo import GRPOConfig, group_loss
from posttrain.training.loop import LossOutput, accumulate
from posttrain.training.rl_loop import Experience, mini_batches
from posttrain.training.rollout import Rollout, response_log_probs, response_logits

F64 = torch.float64

# --- the formulas, by hand -------------------------------------------------------------------


def test_clip_higher_widens_only_the_upper_bound():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.25, 0.5]], dtype=F64)
    advantages = torch.tensor([[1.0, -1.0, 1.0, 1.0, 1.0]], dtype=F64)
    mask = torch.ones_like(ratio)
    loss, clipped = clip_higher_token_loss(ratio.log(), advantages, mask, eps_low=0.2, eps_high=0.28)
    # r=1.5, A=1:   max(−1.5, −1.28) = −1.28, clipped     r=0.5, A=−1: max(0.5, 0.8) = 0.8, clipped
    # r=1.1, A=1:   −1.1, inside [0.8, 1.28]              r=1.25, A=1: −1.25, inside [0.8, 1.28]
    # r=0.5, A=1:   max(−0.5, −0.8) = −0.5: the pessimistic bound keeps the unclipped term
    torch.testing.assert_close(loss, torch.tensor([[-1.28, 0.8, -1.1, -1.25, -0.5]], dtype=F64))
    assert clipped.tolist() == [[True, True, False, False, False]]
    # symmetric ε = 0.2 (PPO): r = 1.25 is now clipped to 1.2
    loss, clipped = clip_higher_token_loss(ratio.log(), advantages, mask, eps_low=0.2, eps_high=0.2)
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -1.1, -1.2, -0.5]], dtype=F64))
    assert clipped.tolist() == [[True, True, False, True, False]]


def test_sequence_ratio_is_the_geometric_mean_and_clips_whole_sequences():
    old = torch.zeros(2, 3, dtype=F64)
    logprobs = torch.tensor([[0.1, 0.3, float("nan")], [-0.4, 0.0, 0.1]], dtype=F64)  # NaN: padding
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    # row 0: (0.1 + 0.3) / 2 = 0.2 on its two tokens; row 1: (−0.4 + 0 + 0.1) / 3 = −0.1
    expected = torch.tensor([[0.2, 0.2, 0.0], [-0.1, -0.1, -0.1]], dtype=F64)
    torch.testing.assert_close(sequence_log_ratio(logprobs, old, mask), expected)
    advantages = torch.tensor([[1.0] * 3, [-1.0] * 3], dtype=F64)
    # ε = 0.1. Sequence level: row 0 ratio e^0.2 = 1.2214 > 1.1 -> −1.1 on each token, clipped;
    # row 1 ratio e^−0.1 = 0.9048 in [0.9, 1.1] -> 0.9048, not clipped
    loss, clipped = clip_higher_token_loss(sequence_log_ratio(logprobs, old, mask), advantages, mask, 0.1, 0.1)
    torch.testing.assert_close(loss[1], torch.full((3,), math.exp(-0.1), dtype=F64))
    torch.testing.assert_close(loss[0, :2], torch.tensor([-1.1, -1.1], dtype=F64))
    assert clipped.tolist() == [[True, True, False], [False, False, False]]
    # token level, row 1: the first token's ratio e^−0.4 = 0.670 with A = −1 is clipped to 0.9
    loss, clipped = clip_higher_token_loss(token_log_ratio(logprobs, old, mask), advantages, mask, 0.1, 0.1)
    assert clipped[1].tolist() == [True, False, False]
    torch.testing.assert_close(loss[1, 0], torch.tensor(0.9, dtype=F64))


PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]], dtype=F64)  # 9.0: padding, never counted
MASK = torch.tensor([[1, 1, 1], [1, 0, 0]])


@pytest.mark.parametrize(
    ("name", "value", "weights"),
    [
        ("dapo", 2.5, [3, 1]),  # (1 + 2 + 3 + 4) / 4 tokens
        ("grpo", 3.0, [1, 1]),  # mean(6/3, 4/1) = mean(2, 4)
        ("bnpo", 2.5, [1, 1]),  # 10 / 4 tokens of this micro-batch
        ("dr_grpo", 1.25, [1, 1]),  # 10 / (2 completions x L_max = 4)
    ],
)
def test_loss_types_on_one_micro_batch(name, value, weights):
    loss_type = LOSS_TYPES[name]
    assert loss_type.mean(PER_TOKEN, MASK, MASK, 4).item() == pytest.approx(value)
    assert loss_type.weight(MASK).tolist() == weights


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("dapo", 1.5),  # (1 + 2 + 3) / 4: the truncated completion's token still counts (TRL)
        ("grpo", 1.0),  # mean(2, 0): the truncated completion adds 0 but still counts
        ("bnpo", 2.0),  # 6 / 3 tokens in the loss
        ("dr_grpo", 0.75),  # 6 / (2 x 4)
    ],
)
def test_loss_types_with_a_truncated_completion_masked(name, value):
    in_loss = torch.tensor([[1, 1, 1], [0, 0, 0]])  # the second completion never emitted EOS
    assert LOSS_TYPES[name].mean(PER_TOKEN, in_loss, MASK, 4).item() == pytest.approx(value)


@pytest.mark.parametrize(
    ("name", "one_batch", "accumulated"),
    [
        ("dapo", 18 / 7, 18 / 7),  # (10 + 8) / 7 tokens, either way
        ("grpo", 13 / 4, 13 / 4),  # mean(2, 4, 6, 1) = (3·2 + 3.5·2) / 4
        ("dr_grpo", 1.125, 1.125),  # 18 / (4 x 4) = (1.25·2 + 1·2) / 4
        ("bnpo", 18 / 7, (2.5 + 8 / 3) / 2),  # one batch: 18/7; two: the mean of 10/4 and 8/3
    ],
)
def test_loss_types_under_accumulation(name, one_batch, accumulated):
    second = torch.tensor([[6.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=F64)  # 8 over 3 tokens
    second_mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    loss_type = LOSS_TYPES[name]
    # the loop: Σ_b C_b·L_b / Σ_b C_b, C_b the micro-batch's summed weights
    parts = [(PER_TOKEN, MASK), (second, second_mask)]
    sums = sum(loss_type.mean(x, m, m, 4) * loss_type.weight(m).sum() for x, m in parts)
    counts = sum(loss_type.weight(m).sum() for _, m in parts)
    assert (sums / counts).item() == pytest.approx(accumulated)
    both, both_mask = torch.cat([PER_TOKEN, second]), torch.cat([MASK, second_mask])
    assert loss_type.mean(both, both_mask, both_mask, 4).item() == pytest.approx(one_batch)


def test_batch_scaled_advantages_use_the_group_mean_and_the_batch_std():
    scores = torch.tensor([0.0, 2.0, 4.0, 6.0])
    # group means 1 and 5 -> centred (−1, 1, −1, 1); batch mean 3, squares 9 + 1 + 1 + 9 = 20,
    # unbiased std √(20/3) = 2.5820
    std = math.sqrt(20 / 3)
    expected = torch.tensor([-1.0, 1.0, -1.0, 1.0]) / (std + 1e-4)
    torch.testing.assert_close(batch_scaled_advantages(scores, 2, scores), expected)
    # this process holds the first group only; the std is still the whole batch's
    torch.testing.assert_close(batch_scaled_advantages(scores[:2], 2, scores), expected[:2])
    # the group's std would give (−1, 1) / (√2 + 1e-4) to both groups alike
    torch.testing.assert_close(rl.grpo_advantages(scores, 2), torch.tensor([-1.0, 1, -1, 1]) / (math.sqrt(2) + 1e-4))


def test_overlong_penalty_follows_dapo_eq_13():
    # L_max = 10, L_cache = 4, P = 0.5: free up to 6 tokens, then −P·(|y| − 6)/4, −P past 10
    lengths = torch.tensor([3, 6, 8, 10, 12])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -0.5])
    torch.testing.assert_close(overlong_penalty(lengths, max_length=10, buffer=4, penalty=0.5), expected)


# --- the trainer's loss on a tiny model -------------------------------------------------------


def experience_batch(tiny_model, n: int = 8, prompt: int = 3, width: int = 6, seed: int = 0, group: int = 1):
    """A model, and experience tensors as make_experience builds them: varied lengths, some truncated,
    old and reference log-probs away from the current ones so that ratios clip; rows in groups of
    ``group`` with one prompt."""
    generator = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    lengths = torch.tensor([6, 2, 4, 1, 5, 3, 6, 2])[:n]
    response_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    sequences = torch.randint(3, 300, (n, prompt + width), generator=generator)
    sequences[:, :prompt] = sequences[::group, :prompt].repeat_interleave(group, dim=0)
    attention = torch.cat([torch.ones(n, prompt, dtype=torch.long), response_mask], dim=1)
    rollout = Rollout(sequences, attention, response_mask, prompt, lengths < width)
    with torch.no_grad():
        logps = response_log_probs(response_logits(model, rollout), rollout, 1.0)
    tensors = {"sequences": sequences, "attention": attention, "response_mask": response_mask,
               "ended": rollout.ended, "prompt_length": torch.full((n,), prompt),
               "old_logprobs": logps + 0.3 * torch.randn(logps.shape, generator=generator),
               "ref_logprobs": logps + 0.5 * torch.randn(logps.shape, generator=generator),
               "advantages": torch.randn(n, 1, generator=generator).expand(n, width).contiguous(),
               "n_tokens": attention.sum(-1)}  # fmt: skip
    return model, tensors


def variant_config(**overrides) -> GRPOConfig:
    """A config whose micro-batches of 2 and 8 share no prompts (3 generations), unless overridden."""
    overrides = {"num_generations": 3} | overrides
    config = GRPOConfig(model="m", prompts="p", reward="r", output="o", max_new_tokens=6, temperature=1.0, **overrides)
    config.validate()
    return config


def step_grads(tiny_model, config: GRPOConfig, batch_size: int, grad_accum: int, group: int = 1):
    """Gradients and loss of one optimizer step over all 8 samples, through the loop's own batching
    (micro-batches keep groups of ``group`` rows whole)."""
    model, tensors = experience_batch(tiny_model, group=group)
    tensors["n_targets"] = LOSS_TYPES[config.loss_type].weight(tensors["response_mask"])
    experience = Experience(tensors, {}, [], [], [], torch.zeros(8), group)
    config = dataclasses.replace(config, batch_size=batch_size, grad_accum=grad_accum, ppo_epochs=1)
    (micro,) = mini_batches(experience, config, seed=3)
    sums = accumulate(model, micro, lambda m, b: group_loss(m, b, config=config), Accelerator(cpu=True))
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sums["loss"] / sums["n_targets"]


@pytest.mark.parametrize("group", [1, 2])  # 2: each group's prompt packed once with its responses
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_accumulation_matches_one_big_batch_where_promised(tiny_model, tmp_path, loss_type, group):
    config = variant_config(loss_type=loss_type, epsilon_high=0.28, mask_truncated_completions=True,
                            num_generations=group if group > 1 else 3)  # fmt: skip
    assert grpo.shares_prompts(dataclasses.replace(config, batch_size=2)) == (group == 2)
    large, loss_large = step_grads(tiny_model, config, batch_size=8, grad_accum=1, group=group)
    small, loss_small = step_grads(tiny_model, config, batch_size=2, grad_accum=4, group=group)
    same = all(torch.allclose(small[n], large[n], atol=1e-7, rtol=1e-5) for n in large)
    if loss_type == "bnpo":  # the mean of micro-batch token means: not one big batch's token mean
        assert not same and abs(loss_small - loss_large) > 1e-4
    else:
        assert same and loss_small == pytest.approx(loss_large, rel=1e-6)


def old_group_loss(model, batch, *, config) -> LossOutput:
    """group_loss as it was before the variants: the default must compute exactly this."""
    rollout = Rollout.from_batch(batch)
    mask = rollout.response_mask
    logps = response_log_probs(response_logits(model, rollout), rollout, config.temperature)
    pg, clipfrac, approxkl = rl.clipped_policy_loss(logps, batch["old_logprobs"], batch["advantages"], mask,
                                                    config.cliprange)  # fmt: skip
    kl = rl.masked_mean(rl.kl_k3(logps, batch["ref_logprobs"]), mask)
    n = mask.sum()
    metrics = {"policy/approxkl": approxkl, "policy/clipfrac": clipfrac, "policy/kl_k3": kl.detach()}
    return LossOutput((pg + config.kl_coef * kl) * n, {k: v * n for k, v in metrics.items()})


def test_the_default_loss_is_bit_identical_to_the_former_computation(tiny_model):
    config = variant_config()
    assert (config.loss_type, config.epsilon_high, config.importance_sampling_level) == ("dapo", 0.2, "token")
    results = []
    for loss_fn in (old_group_loss, group_loss):
        model, tensors = experience_batch(tiny_model)
        tensors["n_targets"] = tensors["response_mask"].sum(-1)  # as make_experience always wrote it
        batch = tensors | {"n_targets": tensors["n_targets"].sum()}
        out = loss_fn(model, batch, config=config)
        out.loss_sum.backward()
        results.append((out, [p.grad.clone() for p in model.parameters()]))
    (old, old_grads), (new, new_grads) = results
    assert 0 < old.metric_sums["policy/clipfrac"] / tensors["n_targets"].sum() < 1  # some ratios were clipped
    assert torch.equal(old.loss_sum, new.loss_sum)
    assert all(torch.equal(old.metric_sums[k], new.metric_sums[k]) for k in old.metric_sums)
    assert set(old.metric_sums) == set(new.metric_sums)
    assert all(torch.equal(a, b) for a, b in zip(old_grads, new_grads, strict=True))


def test_masked_truncated_completions_carry_no_gradient(tiny_model):
    model, tensors = experience_batch(tiny_model)
    truncated = ~tensors["ended"]
    assert truncated.any() and not truncated.all()
    batch = tensors | {"n_targets": tensors["response_mask"].sum()}
    changed = batch | {"advantages": torch.where(truncated[:, None], 5.0, batch["advantages"]),
                       "ref_logprobs": torch.where(truncated[:, None], -9.0, batch["ref_logprobs"])}  # fmt: skip
    for masked, equal in ((True, True), (False, False)):
        config = variant_config(mask_truncated_completions=masked)
        losses = [group_loss(model, b, config=config).loss_sum for b in (batch, changed)]
        assert torch.equal(losses[0], losses[1]) == equal


# --- runs and options -----------------------------------------------------------------------------

RULES = """
def vowel_fraction(prompts, completions):
    return [sum(c in "aeiou" for c in text) / max(len(text), 1) for text in completions]
"""


def grpo_args(tiny_model, tmp_path, output, *extra):
    (tmp_path / "rules.py").write_text(RULES)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS] * 2)
    return ["grpo", "--model", str(tiny_model), "--prompts", str(prompts), "--reward",
            f"{tmp_path / 'rules.py'}:vowel_fraction", "--output", str(output), "--rollout-prompts", "4",
            "--batch-size", "4", "--grad-accum", "2", "--max-new-tokens", "8", "--temperature", "1.0",
            "--max-steps", "2", "--ppo-epochs", "2", "--learning-rate", "1e-2", "--missing-eos-penalty", "0",
            *extra]  # fmt: skip


@pytest.mark.parametrize(
    "options",
    [
        ["--loss-type", "dapo"],
        ["--loss-type", "grpo"],
        ["--loss-type", "bnpo"],
        ["--loss-type", "dr_grpo"],
        "--loss-type grpo --importance-sampling-level sequence --epsilon-high 0.28 --scale-rewards batch "
        "--overlong-buffer 4 --overlong-penalty 0.5".split(),
    ],
)
def test_each_variant_trains_and_logs(tiny_model, tmp_path, options):
    output = tmp_path / "out"
    assert main(grpo_args(tiny_model, tmp_path, output, *options)) == 0
    start, end = load_file(tiny_model / "model.safetensors"), load_file(output / "model.safetensors")
    assert any(not torch.equal(start[k], end[k]) for k in start)
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    names = {"loss", "policy/approxkl", "policy/clipfrac", "policy/kl_k3", "objective/scores", "grad_norm"}
    assert len(records) == 2 and all(
        names <= set(r) and all(map(math.isfinite, (r[n] for n in names))) for r in records
    )
    assert all(0 <= r["policy/clipfrac"] <= 1 for r in records)
    if "--overlong-buffer" in options:  # 8 tokens, free up to 4: a truncated completion pays the full 0.5
        assert all(-0.5 <= r["objective/overlong_penalty"] < 0 for r in records)


def test_mask_truncated_completions_runs(tiny_model, tmp_path):
    output = tmp_path / "out"
    assert main(grpo_args(tiny_model, tmp_path, output, "--mask-truncated-completions", "--loss-type", "dapo")) == 0
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--epsilon-high", "0.1"], "--epsilon-high must be at least --cliprange (0.2), got 0.1"),
        (["--overlong-penalty", "0.5"], "--overlong-penalty needs --overlong-buffer"),
        (["--overlong-buffer", "9"], "--overlong-buffer must be in [0, --max-new-tokens] = [0, 8], got 9"),
        (["--overlong-buffer", "4", "--overlong-penalty", "0"], "--overlong-penalty must be positive"),
        (["--advantage", "rloo", "--scale-rewards", "batch"], "--scale-rewards applies to --advantage grpo only"),
    ],
)
def test_bad_options_exit_2_with_one_line(tiny_model, tmp_path, capsys, options, message):
    assert main(grpo_args(tiny_model, tmp_path, tmp_path / "out", *options)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            ["--loss-type", "sum"],
            "argument --loss-type: invalid choice: 'sum' (choose from 'dapo', 'grpo', 'bnpo', 'dr_grpo')",
        ),
        (["--no-scale-rewards"], "unrecognized arguments: --no-scale-rewards"),
        (
            ["--scale-rewards", "yes"],
            "argument --scale-rewards: invalid choice: 'yes' (choose from 'group', 'batch', 'none')",
        ),
    ],
)
def test_argparse_refuses_unknown_choices(tiny_model, tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        main(grpo_args(tiny_model, tmp_path, tmp_path / "out", *options))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"posttrain grpo: error: {message}"]


@pytest.mark.parametrize("option", ["--importance-sampling-level", "--epsilon-high", "--loss-type"])
def test_a_grpo_option_given_to_ppo_names_the_stages_that_take_it(capsys, option):
    with pytest.raises(SystemExit) as exit_info:
        main(["ppo", "--output", "out", option, "sequence"])
    assert exit_info.value.code == 2
    hint = f"({option} is an option of posttrain grpo / rloo)"
    expected = f"posttrain ppo: error: unrecognized arguments: {option} sequence {hint}"
    assert capsys.readouterr().err.splitlines() == [expected]
