"""The Jinja2 template of eval.html (rendered with autoescape: every value is escaped text)."""

TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>posttrain eval: {{ report.data }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
td.text { white-space: pre-wrap; max-width: 28em; }
.correct { background: #e3f4e3; } .wrong { background: #fbe0e0; }
.abstained { background: #e8eefb; } .no_answer { background: #eeeeee; }
.tag { display: block; font-size: 0.8em; color: #555; }
.figures img { margin: 0.5em; border: 1px solid #ddd; }
</style>
</head>
<body>
<h1>Evaluation of {{ models | length }} model{{ "s" if models | length != 1 else "" }}</h1>
<p>Data: <code>{{ report.data }}</code>: {{ report.questions.total }} questions
({{ report.questions.free_form }} free-form, {{ report.questions.unanswerable }} unanswerable,
{{ report.questions.multiple_choice }} multiple-choice). Abstention: {{ report.settings.abstention }}.
{% if report.settings.gold %}Free-form answers judged by <code>{{ report.settings.gold }}</code>.{% endif %}</p>

<h2>Rates</h2>
<p>Each cell: the rate, its bootstrap 95% interval and the number of questions behind it.
↑ higher is better, ↓ lower is better.</p>
<table>
<tr><th>Rate</th>{% for m in models %}<th>{{ m.name }}</th>{% endfor %}</tr>
{% for key, (title, better) in rates.items() %}
<tr><th>{{ title }} {{ better }}</th>
{% for m in models %}<td class="num">{{ m.rates[key] | percent }}</td>{% endfor %}</tr>
{% endfor %}
<tr><th>Mean length (words)</th>{% for m in models %}<td class="num">{{ m.mean_length.value | number(1) }}
{% if m.mean_length.value is not none %}[{{ m.mean_length.ci_low | number(1) }},
{{ m.mean_length.ci_high | number(1) }}] (n={{ m.mean_length.n }}){% endif %}</td>{% endfor %}</tr>
<tr><th>KL to the reference (nats per answer)</th>{% for m in models %}<td class="num">{{ m.kl_to_ref | number }}</td>
{% endfor %}</tr>
</table>
<div class="figures"><img alt="rates with 95% intervals" src="data:image/png;base64,{{ rates_png }}"></div>

<h2>Calibration</h2>
<p>Over every stated answer (right or wrong; abstentions excluded). Confidence: the probability the
model gave its answer (the product over its tokens; per token: their geometric mean); for multiple
choice, the probability of the picked choice among the choices. ECE: 15 equal-width bins (Guo et al.
2017); adaptive: 15 equal-mass bins (Nixon et al. 2019); Brier: mean squared error of the confidence.
For scale: the GPT-4 technical report (OpenAI 2023) measured an ECE of 0.007 for the pre-trained
model on an MMLU subset and 0.074 after RLHF.</p>
<table>
<tr><th></th>{% for m in models %}<th>{{ m.name }}</th>{% endfor %}</tr>
{% for figure, title in [("calibration", "answer probability"), ("calibration_per_token", "per-token probability")] %}
<tr><th>ECE ({{ title }}) ↓</th>{% for m in models %}<td class="num">{{ m[figure].ece | number }}</td>{% endfor %}</tr>
<tr><th>Adaptive ECE ({{ title }}) ↓</th>{% for m in models %}<td class="num">{{ m[figure].ece_adaptive | number }}</td>
{% endfor %}</tr>
<tr><th>Brier ({{ title }}) ↓</th>{% for m in models %}<td class="num">{{ m[figure].brier | number }}</td>
{% endfor %}</tr>
{% endfor %}
<tr><th>Stated answers</th>{% for m in models %}<td class="num">{{ m.calibration.n }}</td>{% endfor %}</tr>
</table>
<div class="figures">{% for image in reliability_pngs %}
<img alt="reliability diagram of {{ models[loop.index0].name }}" src="data:image/png;base64,{{ image }}">
{% endfor %}</div>

<h2>Answers</h2>
<p>{% if n_rows > rows | length %}The first {{ rows | length }} of {{ n_rows }} questions; answers.jsonl
holds them all.{% else %}Every question.{% endif %} The tag under each answer: its outcome and confidence.</p>
<table>
<tr><th>Row</th><th>Prompt</th><th>Right answer</th>{% for m in models %}<th>{{ m.name }}</th>{% endfor %}</tr>
{% for row in rows %}
<tr><td class="num">{{ row.row }}</td><td class="text">{{ row.prompt | prompt_text }}</td>
<td class="text">{{ row | key_text }}</td>
{% for m in models %}{% set a = row.models[m.name] %}
<td class="text {{ a.outcome }}">{{ a.response }}
<span class="tag">{{ a.outcome }}, {{ a.confidence | number(2) }}</span></td>
{% endfor %}</tr>
{% endfor %}
</table>
</body>
</html>
"""
