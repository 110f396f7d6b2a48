"""Pure numpy numerics of the passes (no graph inside; unit-tested on arrays).

* :mod:`.merge` — channel features, clustering, merge matrices, pruning, repair factors.
"""
