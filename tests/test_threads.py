"""Thread pools sized to the CPUs a process may use, not the machine's (flywheel/threads.py)."""

import os
import subprocess
import sys
import time

import pytest

from flywheel import threads


@pytest.fixture
def clean_env(monkeypatch):
    for variable in (*threads.POOL_VARIABLES, threads.CHOSEN_VARIABLE, "LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


def unsized_env() -> dict[str, str]:
    """This environment without thread-pool sizes, so a child chooses its own."""
    return {k: v for k, v in os.environ.items() if k not in (*threads.POOL_VARIABLES, threads.CHOSEN_VARIABLE)}


def _cgroup_v2(tmp_path, cpu_max: str | None, parent_cpu_max: str | None = None):
    (tmp_path / "job/step").mkdir(parents=True)
    if parent_cpu_max:
        (tmp_path / "job/cpu.max").write_text(parent_cpu_max + "\n")
    if cpu_max:
        (tmp_path / "job/step/cpu.max").write_text(cpu_max + "\n")
    process = tmp_path / "cgroup"
    process.write_text("0::/job/step\n")
    return tmp_path, process


def test_a_cgroup_v2_quota_caps_the_affinity_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    root, process = _cgroup_v2(tmp_path, "150000 100000")
    assert threads.available_cpus(root, process) == 2  # 1.5 CPUs of quota: two threads
    root, process = _cgroup_v2(tmp_path / "b", "max 100000", parent_cpu_max="400000 100000")
    assert threads.available_cpus(root, process) == 4  # the parent's quota binds
    root, process = _cgroup_v2(tmp_path / "c", "max 100000")
    assert threads.available_cpus(root, process) == 64


def test_a_cgroup_v1_quota_caps_the_affinity_mask(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu/cpu.cfs_period_us").write_text("100000\n")
    assert threads.available_cpus(tmp_path, tmp_path / "no-such-file") == 1
    (tmp_path / "cpu/cpu.cfs_quota_us").write_text("-1\n")
    assert threads.available_cpus(tmp_path, tmp_path / "no-such-file") == 4


def test_params_then_the_users_omp_then_a_fair_share_per_launched_rank(clean_env, monkeypatch):
    monkeypatch.setattr(threads, "available_cpus", lambda: 8)
    monkeypatch.setattr(threads, "busy_elsewhere", lambda cpus: 0.0)
    assert threads.choose(3) == 3
    assert threads.choose() == 8
    monkeypatch.setattr(threads, "busy_elsewhere", lambda cpus: 2.8)  # another job on about 3 CPUs
    assert threads.choose() == 5
    monkeypatch.setattr(threads, "busy_elsewhere", lambda cpus: 0.6)  # a browser, a server: no CPU taken
    assert threads.choose() == 8
    monkeypatch.setattr(threads, "busy_elsewhere", lambda cpus: 8.0)
    assert threads.choose() == 1
    clean_env.setenv("LOCAL_SIZE", "4")  # DeepSpeed's launcher started four ranks on this node
    assert threads.choose() == 2
    clean_env.setenv("OMP_NUM_THREADS", "5")  # the user's choice is kept
    assert threads.choose() == 5
    clean_env.setenv(threads.CHOSEN_VARIABLE, "5")  # ... but Flywheel's own, inherited, is re-divided
    assert threads.choose() == 2


def test_the_cpus_other_processes_keep_busy_are_read_from_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    # cpuN user nice system idle iowait ...: over the sample cpu0 is busy, cpu1 idle, cpu2 half
    stat.write_text("cpu 0 0 0 0 0\ncpu0 100 0 0 0 0\ncpu1 0 0 0 100 0\ncpu2 50 0 0 50 0\n")
    after = "cpu 0 0 0 0 0\ncpu0 200 0 0 0 0\ncpu1 0 0 0 200 0\ncpu2 90 0 10 50 50\n"
    monkeypatch.setattr(threads.time, "sleep", lambda seconds: stat.write_text(after))
    assert threads.busy_elsewhere({0, 1, 2}, stat=stat) == pytest.approx(1.5)
    assert threads.busy_elsewhere({0, 1}, stat=tmp_path / "missing") == 0.0


def test_a_busy_cpu_is_left_to_the_process_keeping_it_busy():
    """One CPU of two spinning in another process: a new process takes one thread, not two."""
    two = sorted(os.sched_getaffinity(0))[:2]
    if len(two) < 2:
        pytest.skip("needs two CPUs")
    spinner = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{two[0]}}})\nwhile True: pass"]
    )
    time.sleep(0.2)  # spinning
    try:
        code = f"import os; os.sched_setaffinity(0, {set(two)}); from flywheel import threads; print(threads.choose())"
        output = subprocess.run(
            [sys.executable, "-c", code], env=unsized_env(), capture_output=True, text=True, check=True
        )
    finally:
        spinner.kill()
    assert output.stdout.split() == ["1"]


def test_a_process_pinned_to_one_cpu_runs_torch_on_one_thread():
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from flywheel import threads; chosen = threads.configure()\n"
        "import torch; print(chosen, torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])"
    )
    output = subprocess.run([sys.executable, "-c", code], env=unsized_env(), capture_output=True, text=True, check=True)
    assert output.stdout.split() == ["1", "1", "1"]


def test_an_already_imported_torch_is_resized(clean_env):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    try:
        assert threads.configure(1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
