"""How many compute threads a Flywheel process uses: the CPUs it may run on, not the machine's.

torch (and the OpenMP/MKL/BLAS pools under numpy and scikit-learn) size their pools from the
host's cores. In a container with a CPU quota, under an affinity mask, or beside other jobs, that
oversubscribes the CPUs, and training was seen running 10-50x slower than with one thread. So
every command that computes sizes its pools first: `runtime.threads` in params.yaml when set,
else OMP_NUM_THREADS when the user or a launcher set it, else the CPUs this process may use
(affinity mask and cgroup quota) shared among the ranks a launcher started on this node, less
the CPUs other processes keep (mostly) busy as it starts. That last part matters on a shared
machine: with one of two cores spinning in another job, two torch threads fine-tuned the demo's
model at 80 s an epoch (each parallel region waits for the thread that shares a core), one thread
at 22 s, as fast as two threads on idle cores.
Standard library only: it runs before torch is imported, so the pools start at the right size.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

POOL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")  # rayon: rensa
# What configure() chose, so a child (a launched rank) can tell Flywheel's OMP_NUM_THREADS, which it
# re-divides among the ranks, from one a user or launcher set, which it keeps.
CHOSEN_VARIABLE = "FLYWHEEL_THREADS"
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROCESS_CGROUP = Path("/proc/self/cgroup")
PROC_STAT = Path("/proc/stat")
BUSY_SAMPLE_S = 0.3  # how long the other processes' load is sampled before choosing


def _cgroup_v2_limit(root: Path, process_cgroup: Path) -> float | None:
    """cpu.max of this process's cgroup and its ancestors (the tightest), as CPUs."""
    entries = _read(process_cgroup).splitlines()
    relative = next((line.split("::", 1)[1] for line in entries if line.startswith("0::")), None)
    if relative is None:
        return None
    limits = []
    directory = root / relative.strip().lstrip("/")
    while True:
        quota, _, period = _read(directory / "cpu.max").partition(" ")
        if quota and quota != "max" and period:
            limits.append(int(quota) / int(period))
        if directory == root or root not in directory.parents:
            break
        directory = directory.parent
    return min(limits) if limits else None


def _cgroup_v1_limit(root: Path) -> float | None:
    quota, period = _read(root / "cpu/cpu.cfs_quota_us"), _read(root / "cpu/cpu.cfs_period_us")
    if not quota or not period or int(quota) <= 0:
        return None
    return int(quota) / int(period)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def available_cpus(cgroup_root: Path = CGROUP_ROOT, process_cgroup: Path = PROCESS_CGROUP) -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup CPU quota."""
    cpus = len(_allowed_cpus())
    quota = _cgroup_v2_limit(cgroup_root, process_cgroup) or _cgroup_v1_limit(cgroup_root)
    if quota:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def busy_elsewhere(cpus: set[int], sample_s: float = BUSY_SAMPLE_S, stat: Path = PROC_STAT) -> float:
    """How many of `cpus` other processes kept busy over the next `sample_s` seconds (this one
    sleeps meanwhile): 0.0 where /proc/stat cannot be read."""
    before = _cpu_times(stat, cpus)
    time.sleep(sample_s)
    after = _cpu_times(stat, cpus)
    busy = 0.0
    for cpu, (idle, total) in after.items():
        idle_before, total_before = before.get(cpu, (idle, total))
        if total > total_before:
            busy += 1 - (idle - idle_before) / (total - total_before)
    return busy


def _cpu_times(stat: Path, cpus: set[int]) -> dict[int, tuple[int, int]]:
    """(idle, total) jiffies of each of `cpus`, from /proc/stat's cpuN lines (idle + iowait idle)."""
    times = {}
    for line in _read(stat).splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(value) for value in fields[:8]]
            times[int(name[3:])] = (values[3] + values[4], sum(values))
    return times


def local_processes() -> int:
    """Processes a launcher started on this node (torchrun: LOCAL_WORLD_SIZE, DeepSpeed: LOCAL_SIZE)."""
    for variable in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(variable, "").isdigit():
            return max(1, int(os.environ[variable]))
    return 1


def choose(requested: int = 0) -> int:
    """Threads for this process: `requested` if positive, else OMP_NUM_THREADS, else a fair share."""
    if requested > 0:
        return requested
    user_set = os.environ.get("OMP_NUM_THREADS", "")
    if user_set.isdigit() and int(user_set) > 0 and user_set != os.environ.get(CHOSEN_VARIABLE):
        return int(user_set)
    ranks = local_processes()
    if ranks > 1:  # the launcher's ranks start together: each one's start-up is not another job
        return max(1, available_cpus() // ranks)
    cpus = available_cpus()
    # A CPU counts as taken when others keep it at least 3/4 busy: a browser or a server idling
    # along costs a thread nothing, a job spinning on a core costs one.
    taken = int(busy_elsewhere(_allowed_cpus()) + 0.25)
    return max(1, cpus - taken)


def _allowed_cpus() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def configure(requested: int = 0) -> int:
    """Size the thread pools of this process (and the children it starts); returns the count."""
    threads = choose(requested)
    for variable in (*POOL_VARIABLES, CHOSEN_VARIABLE):
        os.environ[variable] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:  # already imported: its pool read the variables already
        torch.set_num_threads(threads)
    return threads
