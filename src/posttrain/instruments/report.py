"""``posttrain report RUN_DIR [RUN_DIR ...] --output FILE.html``: one self-contained page for runs posttrain wrote.

Per run: its stage, its configuration, its loss and metric curves (several runs overlaid, one colour each),
for RL runs the proxy and gold reward per iteration and against √KL with the fit of Gao et al. 2022 and the
onset of over-optimisation, sample completions from the first, middle and last logged iterations, and the
warnings. Everything is read and checked before anything is written: a directory posttrain did not write,
or a corrupt line in one of its files, stops the command with one line naming the file and the line.
See docs/report.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import UserError

RL_STAGES = ("ppo", "grpo", "rloo")
REWARDS = ["rewards/chosen", "rewards/rejected", "eval/rewards/chosen", "eval/rewards/rejected"]
PANELS = {  # stage -> its metric groups: (panel title, metrics.jsonl keys); eval/ keys: held-out data
    "all": [("loss", ["loss", "eval/loss"]), ("learning rate", ["learning_rate"]), ("gradient norm", ["grad_norm"])],
    "sft": [("token accuracy", ["mean_token_accuracy", "eval/mean_token_accuracy"])],
    "dpo": [("implicit rewards", REWARDS), ("reward margin", ["rewards/margins", "eval/rewards/margins"]),
            ("preference accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
            ("log-probabilities", ["logps/chosen", "logps/rejected"]),
            ("KL to the reference", ["kl/chosen", "kl/rejected"])],
    "rm": [("rewards", [*REWARDS, "rewards/mean", "eval/rewards/mean"]), ("reward margin", ["margin", "eval/margin"]),
           ("preference accuracy", ["accuracy", "eval/accuracy"]), ("calibration error", ["eval/ece"])],
    "rl": [("loss terms", ["loss/policy", "loss/value"]),
           ("proxy score", ["objective/scores", "eval/objective/scores"]),
           ("gold reward", ["objective/gold", "eval/objective/gold"]),
           ("KL to the reference", ["objective/kl", "eval/objective/kl"]),
           ("√KL to the reference", ["objective/sqrt_kl", "eval/objective/sqrt_kl"]),
           ("proxy–gold rank correlation", ["objective/proxy_gold_spearman"]),
           ("score–length correlation", ["objective/length_score_corr"]),
           ("entropy per token", ["objective/entropy_per_token"]),
           ("PPO ratio", ["policy/approxkl", "policy/clipfrac"]), ("completion length", ["completions/mean_length"]),
           ("completions", ["completions/eos_fraction", "completions/duplicate_fraction"]),
           ("value function", ["val/explained_variance", "val/clipfrac"]), ("KL coefficient", ["objective/kl_coef"])],
}  # fmt: skip
NOT_PLOTTED = {"step", "epoch", "episode", "samples_per_second", "tokens_per_second", "rollout_tokens_per_second",
               "objective/gold_std", "objective/gold_count", "eval/pairs"}  # fmt: skip
SAMPLES_SHOWN = 4  # completions shown per chosen iteration
TEXT_LIMIT = 600  # characters of a prompt or completion shown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="output directories of posttrain stages")
    parser.add_argument("--output", required=True, metavar="FILE.html", help="the page to write")


@dataclass
class Run:
    """One run directory, read and checked."""

    name: str
    path: Path
    stage: str
    config: dict[str, Any]
    records: list[dict[str, Any]]  # metrics.jsonl, in file order
    samples: list[dict[str, Any]]  # samples.jsonl (RL stages), or []
    overoptimisation: dict[str, Any] | None  # overoptimisation.json, or None


def run(args: argparse.Namespace) -> None:
    output = check_output(args.output)
    page = render(load_runs(args.runs))
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, output)  # a reader never sees half a page
    print(f"wrote {output}")


# --- reading run directories: everything checked before anything is written -------------------


def check_output(value: str) -> Path:
    """--output names an .html file (never a run's own file) whose nearest existing ancestor is a directory."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise UserError(f"--output {value}: is a directory; name an .html file")
    if path.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--output {value}: name an .html file")
    ancestor = next(p for p in path.absolute().parents if p.exists())
    if not ancestor.is_dir():
        raise UserError(f"--output {value}: {ancestor} is not a directory")
    return path


def load_runs(values: list[str]) -> list[Run]:
    """Every run named (a reward-model ensemble stands for its members, named ENSEMBLE/member-i), each named by its
    directory, or by the path given when two directories share a name."""
    directories: list[tuple[str, Path, bool]] = []  # (path as given, path, an ensemble's member)
    for value in values:
        path = Path(value).expanduser()
        if not path.is_dir():
            raise UserError(f"{value}: {'not a directory' if path.exists() else 'no such directory'}")
        directories += ensemble_members(value, path) or [(value, path, False)]
    seen: dict[Path, str] = {}
    for shown, path, _ in directories:
        if path.resolve() in seen:
            raise UserError(f"{shown}: the same run as {seen[path.resolve()]}; give each run once")
        seen[path.resolve()] = shown
    names = [path.name for _, path, _ in directories]
    return [load_run(shown if member or names.count(path.name) > 1 else path.name, shown, path)
            for shown, path, member in directories]  # fmt: skip


def ensemble_members(shown: str, path: Path) -> list[tuple[str, Path, bool]]:
    """The member directories of a reward-model ensemble (its ensemble.json), or [] for any other directory."""
    index = path / "ensemble.json"
    if not index.is_file() or (path / "metrics.jsonl").exists():
        return []
    members = read_json(index).get("members")
    if not isinstance(members, list) or not all(isinstance(m, str) and m and "/" not in m for m in members):
        raise UserError(f"{index}: field 'members': expected a list of member directory names")
    return [(f"{shown.rstrip('/')}/{m}", path / m, True) for m in members]


def load_run(name: str, shown: str, path: Path) -> Run:
    import yaml

    config_file, metrics_file = path / "config.yaml", path / "metrics.jsonl"
    for file in (config_file, metrics_file):
        if not file.is_file():
            raise UserError(f"{shown}: not a posttrain run (no {file.name})")
    try:
        config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{config_file}: not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict) or not {"model", "output"} <= set(config):
        raise UserError(f"{config_file}: not a posttrain config (expected a mapping with 'model' and 'output')")
    records = read_jsonl(metrics_file, check_record)
    if not records:
        raise UserError(f"{metrics_file}: empty; the run has not logged a step yet")
    samples_file, summary_file = path / "samples.jsonl", path / "overoptimisation.json"
    samples = read_jsonl(samples_file, check_sample) if samples_file.is_file() else []
    summary = check_overoptimisation(read_json(summary_file), summary_file) if summary_file.is_file() else None
    return Run(name, path, stage_of(config), config, records, samples, summary)


def stage_of(config: dict[str, Any]) -> str:
    """The stage whose config fields are closest to config.yaml's keys (the smallest symmetric difference; each
    stage's set is distinct, so a run of this version matches exactly). GRPO and RLOO share their fields: the
    advantage estimator tells them apart."""
    import dataclasses

    from posttrain.cli import STAGES

    keys = set(config)
    distance = {name: len(keys ^ {f.name for f in dataclasses.fields(cls)}) for name, (cls, _, _) in STAGES.items()}
    stage = min(distance, key=distance.__getitem__)
    return config["advantage"] if stage in ("grpo", "rloo") and config.get("advantage") in ("grpo", "rloo") else stage


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object")
    return value


def read_jsonl(path: Path, check) -> list[dict[str, Any]]:
    """One JSON object a line (blank lines skipped), each passed to ``check(row) -> problem or None``."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise UserError(f"{path}: line {number}: not valid JSON ({err.msg}, column {err.colno})") from None
        problem = check(row) if isinstance(row, dict) else "expected a JSON object"
        if problem:
            raise UserError(f"{path}: line {number}: {problem}")
        rows.append(row)
    return rows


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_record(row: dict[str, Any]) -> str | None:
    """A metrics record: an integer step and numbers (NaN allowed: a diverged run logs it)."""
    if not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        return "field 'step': expected an integer"
    bad = next((key for key, value in row.items() if not is_number(value)), None)
    return f"field {bad!r}: expected a number, got {row[bad]!r}" if bad else None


def check_sample(row: dict[str, Any]) -> str | None:
    """A samples.jsonl row: step, prompt (text or chat messages), completion, and numeric score and gold if any."""
    if not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        return "field 'step': expected an integer"
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str | list):
            return f"field {key!r}: expected text or a list of chat messages"
    bad = next((key for key in ("score", "gold") if key in row and not is_number(row[key])), None)
    return f"field {bad!r}: expected a number, got {row[bad]!r}" if bad else None


def check_overoptimisation(summary: dict[str, Any], path: Path) -> dict[str, Any]:
    """overoptimisation.json: {"fit", "onset", "best_gold", "warnings"} as the RL stages write it."""
    from posttrain.instruments.plots import fit_from, onset_from

    for key, parse in (("fit", fit_from), ("onset", onset_from)):
        if summary.get(key) is not None and parse(summary[key]) is None:
            raise UserError(f"{path}: field {key!r}: not a {key} as posttrain writes it")
    best = summary.get("best_gold")
    if best is not None and not (isinstance(best, dict) and is_number(best.get("step"))):
        raise UserError(f"{path}: field 'best_gold': expected null or an object with a 'step'")
    warnings = summary.get("warnings", [])
    if not isinstance(warnings, list) or not all(isinstance(w, dict) and isinstance(w.get("message"), str)
                                                 for w in warnings):  # fmt: skip
        raise UserError(f"{path}: field 'warnings': expected a list of objects with a 'message'")
    return summary


# --- the page ------------------------------------------------------------------------------


def render(runs: list[Run]) -> str:
    """The whole page: runs, curves, reward hacking (RL runs), samples, warnings, configuration."""
    import jinja2
    from markupsafe import Markup

    from posttrain.instruments import plots

    colours = plots.cycle(len(runs))
    series = [(r.name, r.records) for r in runs]
    curves = plots.curves_figure(panels_of(runs), series, x_label(runs))
    rl = [(r, c) for r, c in zip(runs, colours, strict=True) if r.stage in RL_STAGES]
    traces = [rl_trace(r) for r, _ in rl]
    hacking = None
    if traces:
        figure = plots.hacking_figure(traces, colours=[c for _, c in rl])
        rows = [hacking_row(r, t) for (r, _), t in zip(rl, traces, strict=True)]
        gold = any(plots.any_number(t.gold) for t in traces)
        hacking = {"figure": Markup(plots.figure_png(figure)), "rows": rows, "gold": gold}
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(TEMPLATE).render(
        css=Markup(plots.CSS + CSS), colours=colours, runs=runs, curves=Markup(plots.figure_png(curves)),
        hacking=hacking, samples=[sample_groups(r) for r in runs], warnings=[warnings_of(r) for r in runs],
        config=config_rows(runs), several=len(runs) > 1,
    )  # fmt: skip


def panels_of(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """The metric groups of the runs' stages that hold data, then any other logged metric on its own panel."""
    from posttrain.instruments.plots import number

    kinds = {"rl" if r.stage in RL_STAGES else r.stage for r in runs}
    present = {k for r in runs for record in r.records for k, v in record.items() if number(v) is not None}
    panels = [(title, [k for k in keys if k in present]) for kind in PANELS if kind == "all" or kind in kinds
              for title, keys in PANELS[kind]]  # fmt: skip
    known = {k for groups in PANELS.values() for _, keys in groups for k in keys} | NOT_PLOTTED
    return [(t, keys) for t, keys in panels if keys] + [(k, [k]) for k in sorted(present - known)]


def x_label(runs: list[Run]) -> str:
    rl = [r.stage in RL_STAGES for r in runs]
    return "iteration" if all(rl) else "optimizer step (RL: iteration)" if any(rl) else "optimizer step"


def rl_trace(run: Run):
    """The hacking figure's trace of an RL run, with the run's --onset-window and --onset-z for an onset computed
    from metrics.jsonl (a run with gold but no overoptimisation.json)."""
    from posttrain.instruments.plots import metrics_trace

    window, z = run.config.get("onset_window", 5), run.config.get("onset_z", 3.0)  # absent from older runs
    if not (isinstance(window, int) and not isinstance(window, bool) and window >= 1 and is_number(z) and z > 0):
        raise UserError(f"{run.path / 'config.yaml'}: onset_window must be an integer ≥ 1 and onset_z positive")
    return metrics_trace(run.name, run.records, run.overoptimisation, window, z)


def hacking_row(run: Run, trace) -> dict[str, Any]:
    """One RL run's line under the hacking figure: the fit, the onset, the best-gold iteration, in words too."""
    from posttrain.instruments.plots import fit_sentence, fmt, onset_sentence

    fit, onset, summary = trace.fit, trace.onset, run.overoptimisation or {}
    best = summary.get("best_gold")
    source = "overoptimisation.json" if run.overoptimisation is not None else "computed from metrics.jsonl"
    return {"name": run.name, "source": source if any(g is not None for g in trace.gold) else "no gold reward",
            "peak_d": fmt(fit.peak_d, "g") if fit else "–", "peak_gold": fmt(fit.peak_gold, "signed") if fit else "–",
            "r2": fmt(fit.r2, "num2") if fit else "–", "onset": fmt(onset["step"], "int") if onset else "–",
            "best": fmt(best["step"], "int") if best else "–",
            "words": ([fit_sentence(fit)] if fit else []) + ([onset_sentence(onset)] if onset else [])}  # fmt: skip


def sample_groups(run: Run) -> list[dict[str, Any]]:
    """Completions of the first, middle and last iterations in samples.jsonl (SAMPLES_SHOWN of each)."""
    from posttrain.instruments.plots import fmt, plain_text

    steps = sorted({row["step"] for row in run.samples})
    gold = any("gold" in row for row in run.samples)
    groups = []
    for step in sorted({steps[0], steps[len(steps) // 2], steps[-1]}) if steps else []:
        rows = [row for row in run.samples if row["step"] == step][:SAMPLES_SHOWN]
        shown = [{"prompt": plain_text(row["prompt"], TEXT_LIMIT), "score": fmt(row.get("score"), "g"),
                  "completion": plain_text(row["completion"], TEXT_LIMIT), "gold": fmt(row.get("gold"), "g")}
                 for row in rows]  # fmt: skip
        groups.append({"step": step, "gold": gold, "rows": shown})
    return groups


def warnings_of(run: Run) -> list[str]:
    """The run's own warnings (overoptimisation.json), metrics that are not finite, an RL run without gold."""
    own = (run.overoptimisation or {}).get("warnings", [])
    found = [f"iteration {w.get('step', '?')}: {w['message']}" for w in own]
    for key in sorted({k for record in run.records for k in record}):
        steps = [r["step"] for r in run.records if key in r and not math.isfinite(r[key])]
        if steps:
            found.append(f"{key} is not finite at {len(steps)} logged step(s), first at step {steps[0]}")
    if run.stage in RL_STAGES and not any("objective/gold" in r for r in run.records):
        found.append("no --gold-reward: the proxy score alone cannot tell progress from reward hacking")
    return found


def config_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Every option of every run (in first-seen order), one value per run; ``differs`` marks options the runs
    set differently."""
    keys = list(dict.fromkeys(k for r in runs for k in r.config))
    shown = [[yaml_text(r.config[k]) if k in r.config else "–" for r in runs] for k in keys]
    return [{"key": k, "cells": v, "differs": len(set(v)) > 1} for k, v in zip(keys, shown, strict=True)]


def yaml_text(value: Any) -> str:
    """A config value as YAML writes it (true, 2e-05, ''), so it reads like config.yaml."""
    return json.dumps(value) if isinstance(value, bool | None) else "''" if value == "" else str(value)


CSS = """.swatch{display:inline-block;width:.9em;height:.9em;margin-right:.4em;vertical-align:-.1em}
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-size:.9em}tr.differs td,tr.differs th{background:#fff6d6}
"""
TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>posttrain report</title><style>{{ css }}</style></head>
<body><h1>posttrain report</h1><p class="sub">{{ runs | map(attribute="name") | join(", ") }}</p>
<h2>Runs</h2>
<table><tr><th>Run</th><th>Stage</th><th>Directory</th><th>Logged steps</th><th>Last step</th><th>Model</th></tr>
{% for run in runs %}<tr><td><span class="swatch" style="background:{{ colours[loop.index0] }}"></span>
{{- run.name }}</td>
<td>{{ run.stage }}</td><td>{{ run.path }}</td><td class="num">{{ run.records | length }}</td>
<td class="num">{{ run.records[-1].step }}</td><td>{{ run.config["model"] }}</td></tr>
{% endfor %}</table>
<h2>Training curves</h2>
<p>Each panel is one group of metrics from metrics.jsonl; {% if several %}each run has its colour (above), {% endif %}
line styles tell the metrics of a panel apart (eval/: held-out data). Faint lines are the logged values, bold lines
their moving averages.</p>
{{ curves }}
{% if hacking %}<h2>Reward hacking: proxy and gold reward</h2>
<p>Top: the proxy score the policy maximises; bottom: the gold reward, a trusted score that only measures
(<code>--gold-reward</code>{% if not hacking.gold %}; no run here had one, so the bottom row is missing{% endif %}).
Left by iteration, right against √KL to the reference (Gao et al. 2022, “Scaling laws
for reward model overoptimization”). Points are iterations, bold lines moving averages; the dashed curve is
gold ≈ c + d·(α − β·ln d) fitted against d = √KL, the dotted line its peak d*, the dash-dotted line the iteration at
which the gold reward had fallen beyond its noise while the proxy rose (the onset of over-optimisation).</p>
{{ hacking.figure }}
<table><tr><th>Run</th><th>Fit and onset from</th><th>d* (√KL at the fitted peak)</th><th>Fitted peak gold</th>
<th>R²</th><th>Onset iteration</th><th>Best-gold iteration</th></tr>
{% for row in hacking.rows %}<tr><td>{{ row.name }}</td><td>{{ row.source }}</td><td class="num">{{ row.peak_d }}</td>
<td class="num">{{ row.peak_gold }}</td><td class="num">{{ row.r2 }}</td><td class="num">{{ row.onset }}</td>
<td class="num">{{ row.best }}</td></tr>{% endfor %}</table>
{% for row in hacking.rows %}{% for line in row.words %}<p>{{ row.name }}: {{ line }}</p>{% endfor %}{% endfor %}
{% endif %}<h2>Samples</h2>
{% for run in runs %}<h3>{{ run.name }}</h3>{% set groups = samples[loop.index0] %}
{% if not groups %}<p class="note">No samples.jsonl (only the RL stages sample completions).</p>{% endif %}
{% for group in groups %}<table><tr><th colspan="{{ 4 if group.gold else 3 }}">Iteration {{ group.step }}</th></tr>
<tr><th>Prompt</th><th>Completion</th><th>Score</th>{% if group.gold %}<th>Gold</th>{% endif %}</tr>
{% for row in group.rows %}<tr><td><pre>{{ row.prompt }}</pre></td>
<td class="answer"><pre>{{ row.completion }}</pre></td>
<td class="num">{{ row.score }}</td>{% if group.gold %}<td class="num">{{ row.gold }}</td>{% endif %}</tr>
{% endfor %}</table>{% endfor %}{% endfor %}
<h2>Warnings</h2>
{% for run in runs %}<h3>{{ run.name }}</h3>{% if warnings[loop.index0] %}<ul>
{% for line in warnings[loop.index0] %}<li>{{ line }}</li>{% endfor %}</ul>
{% else %}<p class="note">None.</p>{% endif %}{% endfor %}
<h2>Configuration</h2>
{% if several %}<p>Highlighted: options the runs set differently.</p>{% endif %}
<table><tr><th>Option</th>{% for run in runs %}<th>{{ run.name }}</th>{% endfor %}</tr>
{% for row in config %}<tr{% if several and row.differs %} class="differs"{% endif %}><th>{{ row.key }}</th>
{% for value in row.cells %}<td>{{ value }}</td>{% endfor %}</tr>
{% endfor %}</table>
</body></html>
"""
