"""Model folding (cluster + merge channel groups) and the magnitude-pruning baseline.

* :mod:`.plan` — member slices of a group → merged slices (the merge rules per role).
* :mod:`.rewrite` — writing a merge into a ``ModelProto`` (member slices, DimRefs, handlers).
* :mod:`.allocation` — per-group ratios for a parameter target (``--target-params``).
* :mod:`.repair_data` — statistics matching and consumer refit on calibration images.
* :mod:`.fold_pass` — :class:`FoldPass` and :func:`fold`.

The numerics live in :mod:`foldonnx.numerics.merge`; the groups come from
:mod:`foldonnx.analysis`.
"""

from __future__ import annotations

from foldonnx.passes.fold.fold_pass import (
    DEFAULT_KINDS,
    FoldConfig,
    FoldPass,
    FoldReport,
    GroupReport,
    fold,
    parse_group_spec,
)

__all__ = [
    "DEFAULT_KINDS",
    "FoldConfig",
    "FoldPass",
    "FoldReport",
    "GroupReport",
    "fold",
    "parse_group_spec",
]
