"""Side-by-side performance runs of modlora (``python -m benchmarks.run [--quick]``).

Every case runs in one process, interleaved round-robin over repeats, and is reported as medians
and ratios to a reference measured in the same rounds (never absolute times alone). Results go to
a new ``benchmarks/results/runs/<date>_<time>/`` (gitignored); ``--update`` writes the committed
``benchmarks/results/latest.json`` and ``benchmarks/results/latest.md`` instead.
"""
