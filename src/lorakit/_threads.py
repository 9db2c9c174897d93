"""OpenMP's wait policy, set before torch starts its thread pool.

torch's CPU build runs parallel regions on GNU OpenMP. By default an idle OpenMP thread *spins*
(busy-waits) for a while before it sleeps. On a machine whose cores are shared with other processes
that is ruinous: the spinning thread and the thread it waits for compete for one core, and every
parallel region stalls for a scheduler time slice. Measured with ``bench/bench_threads.py`` on the
2-core dev box while other jobs ran: a LoRA step took 15.8 s at 2 threads with spinning, 5.2 s at
1 thread, and 3.5 s at 2 threads with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at once).

OpenMP reads the variable once, when torch loads it, so lorakit sets it (unless the user already
did) at import — which only helps when lorakit is imported before torch, as the ``lorakit`` command
is. ``LORAKIT_OMP_WAIT_POLICY=keep`` leaves the environment alone.
"""

from __future__ import annotations

import os
import sys


def apply_omp_defaults() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless torch is loaded already or the user chose a policy.
    Returns whether this call set it."""
    if "torch" in sys.modules or os.environ.get("LORAKIT_OMP_WAIT_POLICY") == "keep":
        return False
    if "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
