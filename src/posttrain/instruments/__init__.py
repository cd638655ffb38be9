"""Instruments that measure any model or run: best-of-n, evaluation, reports."""
