"""Greedy allocation of a parameter budget over candidates ("cheapest damage per parameter
first"), shared by fold's per-group ratios and low rank's per-layer ranks (pure numpy).

Each candidate (a channel group, a linear layer) has a ladder of steps: ``units[s]`` units
removed (channels cut, rank given up) at a cumulative cost ``costs[s]`` (distortion, output
error), ``units[0] = costs[0] = 0``. Starting from step 0 everywhere, the allocator repeatedly
takes the next step of the candidate whose added cost per parameter removed is smallest, until
the parameters removed reach the target. Parameters are counted by a *ledger* supplied by the
caller, so interactions are exact (fold: a tensor carrying two groups on different axes shrinks
as a product; low rank: a layer saves parameters only once ``k·(in+out) < in·out``). A step that
removes no parameter is walked past at no cost; the last step stops at the unit count whose
exact parameter count is nearest the target.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

__all__ = ["Ledger", "Ladder", "greedy_allocate", "BudgetError"]

logger = logging.getLogger(__name__)


class BudgetError(ValueError):
    """The target cannot be reached by taking every step of every candidate."""

    def __init__(self, reached: int) -> None:
        super().__init__(f"target out of reach ({reached} parameters at the last step of every candidate)")
        self.reached = reached


class Ledger(Protocol):
    """Exact parameter count of a set of removals."""

    removed: int

    def delta(self, key: Hashable, units: int) -> int:
        """Parameters removed additionally if *key* gives up *units* more units."""

    def apply(self, key: Hashable, units: int) -> None:
        """Record that *key* gives up *units* more units."""


@dataclass
class Ladder:
    """The steps of one candidate: ``units[s]`` removed at cumulative ``costs[s]``."""

    key: Hashable
    units: Sequence[int]
    costs: Sequence[float]
    #: unit counts a partial last step may stop at (default: any)
    allowed: Callable[[int], bool] | None = None
    step: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if len(self.units) != len(self.costs) or not len(self.units):
            raise ValueError(f"ladder {self.key!r}: units and costs must be non-empty and of equal length")
        # a larger removal never costs less
        self.costs = list(np.maximum.accumulate(np.asarray(self.costs, dtype=np.float64)))


def greedy_allocate(ladders: Sequence[Ladder], need: float, ledger: Ledger) -> dict[Hashable, int]:
    """Units removed per candidate so that ``ledger.removed`` reaches *need* (see module
    docstring). Raises :class:`BudgetError` when every step of every ladder is not enough."""
    by_key = {lad.key: lad for lad in ladders}
    while ledger.removed < need:
        best, best_cost, walked = None, np.inf, False
        for lad in ladders:
            s = lad.step
            if s + 1 >= len(lad.units):
                continue
            du = lad.units[s + 1] - lad.units[s]
            dp = ledger.delta(lad.key, du) if du > 0 else 0
            if dp <= 0:  # a step that removes nothing (rounding, a factorisation not yet worth it)
                lad.step = s + 1
                ledger.apply(lad.key, du)
                walked = True
                continue
            cost = (lad.costs[s + 1] - lad.costs[s]) / dp
            if cost < best_cost:
                best, best_cost = lad.key, cost
        if best is None and walked:
            continue
        if best is None:
            raise BudgetError(ledger.removed)
        lad = by_key[best]
        s = lad.step
        du = lad.units[s + 1] - lad.units[s]
        if ledger.removed + ledger.delta(best, du) >= need:
            # the last step: the unit count whose exact parameter count is nearest the target
            options = [c for c in range(du + 1) if lad.allowed is None or lad.allowed(lad.units[s] + c)]
            c = min(options, key=lambda c: abs(ledger.removed + ledger.delta(best, c) - need))
            ledger.apply(best, c)
            return {**{k.key: k.units[k.step] for k in ladders}, best: lad.units[s] + c}
        ledger.apply(best, du)
        lad.step = s + 1
    return {lad.key: lad.units[lad.step] for lad in ladders}
