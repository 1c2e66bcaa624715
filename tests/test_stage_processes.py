"""A checkpointed stage runs once at a time per project, and never outlives what started it: a
`dvc repro` killed with kill -9 used to leave its trainer running, and the re-run started a
second one on the same checkpoints (they deleted each other's for minutes)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from flywheel.errors import FlywheelError
from flywheel.io import exclusive_lock

HOLD_LOCK = """
import sys
from flywheel.io import exclusive_lock
from flywheel.errors import FlywheelError
try:
    with exclusive_lock(sys.argv[1], "another `flywheel finetune`"):
        print("held")
except FlywheelError as error:
    print(error)
"""


def test_a_second_run_of_a_checkpointed_stage_is_refused_while_the_first_holds_its_lock(tmp_path):
    lock = tmp_path / "models/.checkpoints/finetune.lock"
    with exclusive_lock(lock, "another `flywheel finetune`"):
        second = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(lock)], capture_output=True, text=True)
        assert f"another `flywheel finetune` is already running here (pid {os.getpid()}" in second.stdout
    with pytest.raises(FlywheelError, match="already running"):
        with exclusive_lock(lock, "a"), exclusive_lock(lock, "a"):
            pass
    # Released with its holder, however it ended: the next run goes ahead.
    after = subprocess.run([sys.executable, "-c", HOLD_LOCK, str(lock)], capture_output=True, text=True)
    assert after.stdout.strip() == "held"


PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import time; from flywheel.cli import _die_with_parent; _die_with_parent(); time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_stage_stops_when_the_process_that_started_it_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(1)  # the child is running, watching its parent
    parent.send_signal(signal.SIGKILL)  # dvc repro killed with kill -9
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if _zombie(child):
            return
        time.sleep(0.2)
    os.kill(child, signal.SIGKILL)
    raise AssertionError("the orphaned stage kept running")


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
