"""The OpenMP wait policy lorakit sets before torch loads (bench/bench_threads.py measures why)."""

from __future__ import annotations

import os
import subprocess
import sys


def _policy_in_child(env_extra: dict, code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "LORAKIT_OMP_WAIT_POLICY")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code + "; import os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         capture_output=True, text=True, check=True, env=env)
    return out.stdout.strip().splitlines()[-1]


def test_importing_lorakit_first_makes_openmp_threads_sleep():
    assert _policy_in_child({}, "import lorakit") == "PASSIVE"


def test_a_users_choice_and_the_opt_out_are_kept():
    assert _policy_in_child({"OMP_WAIT_POLICY": "ACTIVE"}, "import lorakit") == "ACTIVE"
    assert _policy_in_child({"LORAKIT_OMP_WAIT_POLICY": "keep"}, "import lorakit") == "None"


def test_too_late_once_torch_is_loaded_so_nothing_is_changed():
    assert _policy_in_child({}, "import torch, lorakit") == "None"
