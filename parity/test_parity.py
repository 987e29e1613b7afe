"""`pytest parity/` collects this module: one test per preview of the cases (see `--parity-cases`).

Each test regenerates its preview with the reference pipeline (and the training recipe), compares, and passes
when the thresholds hold. The plugin (`parity.plugin`) parametrizes it and writes the reports.
"""


def test_preview(parity_task, parity_checker):
    parity_checker.verify(parity_task)
