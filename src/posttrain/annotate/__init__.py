"""``posttrain annotate``: pairwise preference labelling by people. ``sample`` draws pairs of answers
from a model, ``serve`` shows them to annotators in a browser (each person follows a private link),
the labels go to a SQLite database (``store``), and ``export`` writes them as TRL preference rows
with provenance, one row per label or aggregated per pair by majority vote or by Dawid and Skene's
1979 annotator-reliability model, ready for ``posttrain rm`` and ``posttrain dpo``.
"""
