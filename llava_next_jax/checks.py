"""Argument checks shared across the package (numpy only: the processor, which runs without jax, uses them)."""

from __future__ import annotations

import numpy as np


def is_int(value) -> bool:
    """An int or a numpy integer, and not a bool (True is an int to Python, never a count or an index here)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def is_positive_int(value) -> bool:
    """`is_int` and >= 1: a size or a count."""
    return is_int(value) and value >= 1
