"""The CPUs this process may use (affinity mask, cgroup quota), without importing torch, so the
command can decide OpenMP's settings before torch loads (``cli.set_wait_policy``) and the
runtime can size its thread pool (``engine.runtime.choose_threads``) from the same count."""

from __future__ import annotations

import math
import os


def cpu_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs a cgroup CPU quota allows this process (cgroup v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``/``cpu.cfs_period_us``, e.g. 1.5 for 150000/100000), or None where no
    quota is set or readable."""
    candidates = ((f"{root}/cpu.max", None),
                  (f"{root}/cpu/cpu.cfs_quota_us", f"{root}/cpu/cpu.cfs_period_us"))
    for quota_file, period_file in candidates:
        try:
            with open(quota_file) as f:
                fields = f.read().split()
            if period_file is not None:
                with open(period_file) as f:
                    fields.append(f.read().strip())
        except OSError:
            continue
        if len(fields) < 2 or fields[0] in ("max", "-1"):
            return None
        try:
            return int(fields[0]) / int(fields[1])
        except (ValueError, ZeroDivisionError):
            return None
    return None


def usable_cores() -> int:
    """The CPUs this process may run on: its affinity mask (``taskset``, SLURM's binding),
    capped by a cgroup CPU quota (a container's ``--cpus``), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)
