"""Fault points: named places where a test can kill the process, to prove that a run killed anywhere resumes exactly.

``OTCA_FAULT_AT="<point>:<iteration>"`` makes :func:`fault_point` send SIGKILL to its own process when it reaches
that point at that iteration (no clean-up, no flushing: what a power cut or the out-of-memory killer does). Unset,
a fault point is a dictionary lookup. The points the trainer and the checkpoint writer pass are listed in
``docs/design.md`` (section "Resume"); the fault-injection tests (``tests/test_faults.py``) kill a real
``otca train`` at each and resume it.
"""

from __future__ import annotations

import os
import signal

ENV = "OTCA_FAULT_AT"


def fault_point(point: str, iteration: int) -> None:
    """SIGKILL this process if ``OTCA_FAULT_AT`` names ``point`` at ``iteration``."""
    want = os.environ.get(ENV)
    if want and want == f"{point}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)
