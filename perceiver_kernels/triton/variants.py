"""The switch between the Triton kernels a GPU has timed and the rewrites it has not yet.

A kernel rewrite stays beside the kernels it would replace until a GPU run times both
(docs/DESIGN.md, "Adding a kernel"): by default the launchers run the timed kernels, the
ones policy.py's measurements describe; with the switch on "untimed" they run a
rewrite wherever one serves the problem, and the timed kernels elsewhere. The benchmark
times both in one run (`perceiver_kernels[triton untimed]` rows); the run decides which
stays, and the loser is deleted.

PERCEIVER_KERNELS_TRITON=untimed sets the switch for a process; `running(...)` sets it
for a block of code. The launchers' plans are cached per problem and switch position.
"""

from __future__ import annotations

import contextlib
import os

TIMED = "timed"
UNTIMED = "untimed"
CHOICES = (TIMED, UNTIMED)


def _from_environment() -> str:
    choice = os.environ.get("PERCEIVER_KERNELS_TRITON", TIMED)
    if choice not in CHOICES:
        raise ValueError(f"PERCEIVER_KERNELS_TRITON must be one of {CHOICES}, got {choice!r}")
    return choice


current = _from_environment()


@contextlib.contextmanager
def running(choice: str):
    """Runs the Triton kernels of `choice` ("timed" or "untimed") inside the block."""
    global current
    if choice not in CHOICES:
        raise ValueError(f"choice must be one of {CHOICES}, got {choice!r}")
    previous, current = current, choice
    try:
        yield
    finally:
        current = previous
