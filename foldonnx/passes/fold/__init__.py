"""Model folding (cluster + merge channel groups) and the magnitude-pruning baseline.

* :mod:`.numerics` — pure numpy: features, k-means, merge matrices, pruning, repair factors.
* :mod:`.plan` — member slices of a group → merged slices (the merge rules per role).
* :mod:`.rewrite` — writing a merge into a ``ModelProto`` (copy-on-write, DimRefs, handlers).
* :mod:`.allocation` — per-group ratios for a parameter target (``--target-params``).
* :mod:`.repair_data` — REPAIR-style statistics matching on calibration images.
* :mod:`.pass_` — :class:`FoldPass` and :func:`fold`.
"""

from __future__ import annotations

from foldonnx.passes.fold.pass_ import (
    DEFAULT_KINDS,
    FoldPass,
    FoldReport,
    FoldResult,
    GroupReport,
    SkippedGroup,
    fold,
    parse_group_spec,
)

__all__ = [
    "DEFAULT_KINDS",
    "FoldPass",
    "FoldReport",
    "FoldResult",
    "GroupReport",
    "SkippedGroup",
    "fold",
    "parse_group_spec",
]
