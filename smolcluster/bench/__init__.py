"""Benchmarks: ``python -m smolcluster.bench NAME``.

Each benchmark is a module ``smolcluster/bench/NAME.py`` with ``main(argv) -> int``.
It measures against a baseline *in the same run* and reports through
:func:`smolcluster.bench.report.write_report` (a Markdown table on stdout and
``bench-NAME.json`` with the raw figures).
"""
