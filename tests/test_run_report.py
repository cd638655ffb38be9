"""``posttrain report``: one self-contained page for runs posttrain wrote; the shared reward-hacking figure."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import WORDS, write_jsonl
from posttrain import config as config_io
from posttrain.cli import STAGES, main
from posttrain.instruments.plots import (
    GOLD_COLOUR,
    PROXY_COLOUR,
    RUN_COLOURS,
    Trace,
    hacking_figure,
    metrics_trace,
    plain_text,
)
from posttrain.instruments.report import stage_of
from posttrain.ops.overoptimisation import fit_curve
from posttrain.stages.grpo import GRPOConfig
from posttrain.stages.sft import SFTConfig


def gao(d: float) -> float:
    """Gao et al.'s RL form with c = 0.5, α = β = 1: peak at d* = exp(α/β − 1) = 1, gold there c + β·d* = 1.5."""
    return 0.5 + d * (1 - math.log(d)) if d > 0 else 0.5


def write_run(directory: Path, config, records: list[dict], samples: list[dict] | None = None,
              overoptimisation: dict | None = None) -> Path:  # fmt: skip
    directory.mkdir(parents=True)
    config_io.save(dataclasses.replace(config, output=str(directory)), directory / "config.yaml")
    write_jsonl(directory / "metrics.jsonl", records)
    if samples is not None:
        write_jsonl(directory / "samples.jsonl", samples)
    if overoptimisation is not None:
        (directory / "overoptimisation.json").write_text(json.dumps(overoptimisation))
    return directory


def sft_run(directory: Path, model: str = "models/tiny") -> Path:
    records = [{"step": s, "epoch": s / 10, "loss": 3.0 / s, "mean_token_accuracy": 0.05 * s,
                "learning_rate": 1e-3 * (1 - s / 10), "grad_norm": 1.0 + s % 3} for s in range(1, 11)]  # fmt: skip
    records += [{"step": s, "eval/loss": 3.5 / s, "eval/mean_token_accuracy": 0.04 * s} for s in (5, 10)]
    return write_run(directory, SFTConfig(model=model, data="train.jsonl"), records)


def rl_records(steps: int = 20) -> list[dict]:
    """d = √KL = step/10, gold on Gao's curve (peak at step 10), proxy rising; std 0.01 over 100 samples."""
    records = [{"step": 0, "eval/objective/scores": 0.0, "eval/objective/gold": 0.5, "eval/objective/sqrt_kl": 0.0}]
    for step in range(1, steps + 1):
        d = step / 10
        records.append({"step": step, "loss": -0.1, "learning_rate": 1e-5, "grad_norm": 0.5,
                        "objective/scores": 0.2 * step, "objective/kl": d * d, "objective/sqrt_kl": d,
                        "objective/gold": gao(d), "objective/gold_std": 0.01, "objective/gold_count": 100.0,
                        "policy/approxkl": 0.01, "completions/mean_length": 8.0})  # fmt: skip
    return records


def rl_run(directory: Path, completion: str = "fine", overoptimisation: dict | None = None) -> Path:
    samples = [{"step": s, "prompt": f"say {WORDS[s]}", "completion": f"{completion} {s}", "score": 0.1 * s,
                "gold": -1.0 * s} for s in range(2, 21, 2) for _ in range(5)]  # fmt: skip
    config = GRPOConfig(model="runs/sft", prompts="prompts.jsonl", reward="rm", gold_reward="gold.py:gold")
    return write_run(directory, config, rl_records(), samples, overoptimisation)


def report(tmp_path: Path, *runs: Path) -> str:
    output = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--output", str(output)]) == 0
    return output.read_text()


def images(page: str) -> list[bytes]:
    return [base64.b64decode(d) for d in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def hacking_table(page: str) -> list[list[str]]:
    """The cells of the table under the reward-hacking figure, one list per run."""
    table = page[page.index("<th>Best-gold iteration</th>") :].split("</table>")[0]
    return [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in table.split("<tr>")[1:]]


def test_stage_is_read_from_the_config_fields():
    for name, (cls, _, _) in STAGES.items():
        config = dataclasses.asdict(cls(model="m", output="o"))
        assert stage_of(config) == name
        assert stage_of({k: v for k, v in config.items() if k != "seed"}) == name  # an older run lacking a field


def test_sft_run_and_rl_run_side_by_side(tmp_path):
    page = report(tmp_path, sft_run(tmp_path / "sft"), rl_run(tmp_path / "grpo"))
    assert re.search(r"sft</td>\s*<td>sft</td>", page) and re.search(r"grpo</td>\s*<td>grpo</td>", page)
    pngs = images(page)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)  # the curves, the hacking figure
    assert "http" not in re.sub(r"base64,[A-Za-z0-9+/=]+", "", page) and "<link" not in page
    # no overoptimisation.json: the fit and the onset come from metrics.jsonl. Fit: the gold lies exactly on
    # Gao's curve, so d* = 1 and the peak gold 1.5. Onset (window 5, z 3, patience 2): the 5-iteration means of
    # gold end 1.4836, 1.4899, 1.4860, 1.4728 at iterations 11-14; their noise is √(5·0.001²)/5 ≈ 0.00045, so the
    # falls after the best (iteration 12) are far beyond 3·√2·0.00045 and it fires at the second one, 14.
    (row,) = hacking_table(page)
    assert row == ["grpo", "computed from metrics.jsonl", "1", "+1.50", "1.00", "14", "–"]
    assert "window ending at iteration 12" in page
    found = re.findall(r'<th colspan="4">Iteration (\d+)</th>', page)
    assert found == ["2", "12", "20"]  # first, middle and last of the iterations in samples.jsonl
    assert page.count('<td class="answer">') == 3 * 4  # four completions of each
    assert '<tr class="differs"><th>output</th>' in page and "<th>packing</th>" in page  # SFT's option, RL's "–"
    assert "no --gold-reward" not in page


def test_overoptimisation_json_is_read_not_recomputed(tmp_path):
    onset = {"step": 7, "peak_step": 5, "best_gold": 1.2, "gold": 1.0, "drop": 0.2, "noise": 0.05,
             "proxy_at_peak": 1.0, "proxy": 1.4}  # fmt: skip
    fit = fit_curve([0.5, 1.0, 2.0, 3.0], [1.0, 1.4, 1.2, 0.4], "rl")
    best = {"step": 5, "smoothed_gold": 1.2, "directory": "best-gold"}
    warnings = [{"kind": "kl_budget", "step": 9, "message": "KL passed 3"}]
    summary = {"fit": fit.as_dict(), "onset": onset, "best_gold": best, "warnings": warnings}
    page = report(tmp_path, rl_run(tmp_path / "grpo", overoptimisation=summary))
    (row,) = hacking_table(page)
    assert row[1] == "overoptimisation.json" and row[2] == format(fit.peak_d, ".4g") and row[-2:] == ["7", "5"]
    assert "fell from +1.20 (window ending at iteration 5) to +1.00, 4.0 times its noise" in page
    assert "<li>iteration 9: KL passed 3</li>" in page


def test_several_runs_get_one_colour_each_and_names_stay_apart(tmp_path):
    first, second = sft_run(tmp_path / "a" / "sft"), sft_run(tmp_path / "b" / "sft")
    page = report(tmp_path, first, second)
    names = re.findall(r'<span class="swatch" style="background:(#[0-9a-f]+)"></span>([^<]+)</td>', page)
    assert names == [(RUN_COLOURS[0], str(first)), (RUN_COLOURS[1], str(second))]  # same name: the paths given
    assert "Reward hacking" not in page and len(images(page)) == 1
    assert "No samples.jsonl" in page


def test_run_text_is_escaped(tmp_path):
    chat = [{"role": "user", "content": "<b>bold</b> & \x07"}]
    run = rl_run(tmp_path / "grpo", completion='<script>alert("x")</script>')
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    write_jsonl(run / "samples.jsonl", [dict(r, prompt=chat) for r in rows])
    config = (run / "config.yaml").read_text().replace("model: runs/sft", "model: <img src=x onerror=alert(1)>")
    (run / "config.yaml").write_text(config)
    page = report(tmp_path, run)
    assert "<script" not in page and "<b>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "user: &lt;b&gt;bold&lt;/b&gt; &amp; ␇" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_an_ensemble_stands_for_its_members(tmp_path):
    ensemble = tmp_path / "rm"
    ensemble.mkdir()
    (ensemble / "ensemble.json").write_text(json.dumps({"members": ["member-0", "member-1"], "seeds": [1, 2]}))
    for i in range(2):
        sft_run(ensemble / f"member-{i}")
    page = report(tmp_path, ensemble)
    assert re.findall(r"</span>([^<]+)</td>", page) == [f"{ensemble}/member-0", f"{ensemble}/member-1"]


def test_a_real_grpo_run_with_gold(tiny_model, tmp_path):
    rules = tmp_path / "rules.py"
    rules.write_text("def vowels(p, c):\n    return [sum(x in 'aeiou' for x in t) for t in c]\n"
                     "def gold(p, c):\n    return [len(t) % 3 for t in c]\n")  # fmt: skip
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {w}"} for w in WORDS])
    run = tmp_path / "grpo"
    assert main(["grpo", "--model", str(tiny_model), "--prompts", str(prompts), "--reward", f"{rules}:vowels",
                 "--gold-reward", f"{rules}:gold", "--output", str(run), "--rollout-prompts", "4", "--batch-size", "8",
                 "--max-new-tokens", "6", "--max-steps", "6", "--sample-steps", "2"]) == 0  # fmt: skip
    page = report(tmp_path, run)
    (row,) = hacking_table(page)
    assert row[:2] == ["grpo", "overoptimisation.json"]
    assert re.findall(r'<th colspan="4">Iteration (\d+)</th>', page) == ["2", "4", "6"]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "{runs}/nothing: no such directory"),
        ("file", "{runs}/prompts.jsonl: not a directory"),
        ("no-config", "{runs}/grpo: not a posttrain run (no config.yaml)"),
        ("no-metrics", "{runs}/grpo: not a posttrain run (no metrics.jsonl)"),
        ("corrupt-line", "{runs}/grpo/metrics.jsonl: line 4: not valid JSON"),
        ("text-metric", "{runs}/grpo/metrics.jsonl: line 3: field 'loss': expected a number, got 'low'"),
        ("bad-sample", "{runs}/grpo/samples.jsonl: line 2: field 'gold': expected a number"),
        ("bad-summary", "{runs}/grpo/overoptimisation.json: not valid JSON"),
        ("twice", "{runs}/grpo/: the same run as {runs}/grpo"),
        ("output-dir", "--output {runs}: is a directory"),
        ("output-json", "--output {runs}/grpo/metrics.jsonl: name an .html file"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, case, expected):
    runs = tmp_path / "runs"
    run = rl_run(runs / "grpo")
    (runs / "prompts.jsonl").write_text("{}\n")
    output = runs / "report.html"
    output.write_text("the previous report")
    args = [str(run)]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    if case in ("missing", "file"):
        args = [str(runs / ("nothing" if case == "missing" else "prompts.jsonl"))]
    elif case in ("no-config", "no-metrics"):
        (run / ("config.yaml" if case == "no-config" else "metrics.jsonl")).unlink()
    elif case in ("corrupt-line", "text-metric"):
        corrupt = '{"step": 3' if case == "corrupt-line" else '{"step": 2, "loss": "low"}'
        lines[3 if case == "corrupt-line" else 2] = corrupt
        (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    elif case == "bad-sample":
        (run / "samples.jsonl").write_text('{"step": 1, "prompt": "a", "completion": "b"}\n{"step": 2, "prompt": "a", '
                                           '"completion": "b", "gold": "high"}\n')  # fmt: skip
    elif case == "bad-summary":
        (run / "overoptimisation.json").write_text('{"fit": ')
    elif case == "twice":
        args = [str(run), f"{run}/"]
    elif case.startswith("output"):
        output = runs if case == "output-dir" else run / "metrics.jsonl"
    before = {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()}
    assert main(["report", *args, "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"posttrain report: error: {expected.format(runs=runs)}") and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in runs.rglob("*") if p.is_file()} == before


# --- the shared figure ----------------------------------------------------------------------------


def lines_labelled(fig, prefix: str) -> list:
    return [line for ax in fig.axes for line in ax.get_lines() if line.get_label().startswith(prefix)]


def test_hacking_figure_draws_the_fit_its_peak_and_the_onset():
    records = rl_records()
    trace = metrics_trace("run", records, None)
    assert trace.fit.peak_d == pytest.approx(1.0) and trace.fit.peak_gold == pytest.approx(1.5)
    assert trace.onset["step"] == 14 and trace.onset["peak_step"] == 12  # worked out in the report test above
    fig = hacking_figure([trace])
    assert len(fig.axes) == 4  # proxy and gold, by iteration and against √KL
    (fit,) = lines_labelled(fig, "fit run")
    d = np.asarray(fit.get_xdata())
    assert d.max() == pytest.approx(2.0) and np.allclose(fit.get_ydata()[1:], [gao(x) for x in d[1:]])
    (peak,) = lines_labelled(fig, "d* run")
    assert peak.get_xdata()[0] == pytest.approx(1.0)
    onsets = sorted(line.get_xdata()[0] for line in lines_labelled(fig, "onset run"))
    assert onsets == pytest.approx([1.4, 1.4, 14, 14])  # iteration 14, at √KL 1.4, on both rows
    colours = {line.get_label(): line.get_color() for line in lines_labelled(fig, "")}
    assert colours["proxy run"] == PROXY_COLOUR and colours["gold run"] == GOLD_COLOUR


def test_hacking_figure_overlays_runs_and_drops_the_gold_row_without_gold():
    records = rl_records(8)
    without_gold = [{k: v for k, v in r.items() if "gold" not in k} for r in records]
    first, second = metrics_trace("a", without_gold, None), metrics_trace("b", without_gold, None)
    assert first.fit is None and first.onset is None
    fig = hacking_figure([first, second], colours=["#111111", "#222222"])
    assert len(fig.axes) == 2
    colours = {line.get_label(): line.get_color() for line in lines_labelled(fig, "proxy")}
    assert colours == {"proxy a": "#111111", "proxy b": "#222222"}


def test_hacking_figure_skips_a_peak_far_beyond_the_run():
    trace = Trace("far", [1, 2, 3], [0.1, 0.2, 0.3], [1, 2, 3], [0.1, 0.2, 0.3])
    trace.fit = fit_curve([0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.39], "bon")  # d* = α/(2β) far beyond 0.3
    fig = hacking_figure([trace])
    assert lines_labelled(fig, "fit far") and not lines_labelled(fig, "d* far")


def test_plain_text():
    assert plain_text("a\x00b\x1bc\x7f\nd\te", 100) == "a␀b␛c␡\nd\te"
    assert plain_text([{"role": "user", "content": "hi"}, "x"], 100) == 'user: hi\n"x"'
    assert plain_text("abcdef", 3) == "abc…"


def test_metric_groups_follow_the_stages_and_keep_unknown_metrics():
    from posttrain.instruments.plots import curves_figure
    from posttrain.instruments.report import Run, panels_of

    record = {"step": 1, "loss": 1.0, "grad_norm": 2.0, "my/metric": 3.0, "tokens_per_second": 9.0,
              "mean_token_accuracy": float("nan")}  # fmt: skip
    sft = Run("sft", Path("sft"), "sft", {}, [record], [], None)
    rl = Run("rl", Path("rl"), "rloo", {}, rl_records(3), [], None)
    assert panels_of([sft]) == [("loss", ["loss"]), ("gradient norm", ["grad_norm"]), ("my/metric", ["my/metric"])]
    titles = [title for title, _ in panels_of([sft, rl])]
    assert titles[:4] == ["loss", "learning rate", "gradient norm", "proxy score"] and "gold reward" in titles
    assert ("proxy score", ["objective/scores", "eval/objective/scores"]) in panels_of([rl])
    fig = curves_figure(panels_of([sft, rl]), [("sft", sft.records), ("rl", rl.records)], "step")
    loss = {line.get_color() for line in fig.axes[0].get_lines() if line.get_label() == "loss"}
    assert loss == {RUN_COLOURS[0], RUN_COLOURS[1]}
    alone = curves_figure(panels_of([sft]), [("sft", sft.records)], "step")
    assert alone.axes[0].get_xlim() == (0, 2)  # one logged step: whole-number ticks around it
