"""The one error the evaluation library raises for a request it cannot meet."""

from __future__ import annotations


class EvalError(ValueError):
    """An evaluation request that cannot be met: a missing weights file, too few images, a bad index."""
