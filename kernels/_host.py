"""Host-side integer helpers for the launchers.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects in recent
Triton: called from Python they cost 4-6 us each (Triton 3.9, the 2-core dev box), and the
launchers call them a dozen or more times per op. These are the same functions in plain Python.
"""

from __future__ import annotations

#: The largest grid along CUDA's y and z axes (x allows 2**31 - 1).
MAX_GRID_YZ = 65535


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints, ``b > 0`` (as ``triton.cdiv``)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` for ``n >= 1``; 0 for ``n == 0`` (as
    ``triton.next_power_of_2``)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
