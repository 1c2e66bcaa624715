"""The data stages on a Ray cluster of two hosts: a head and a worker node, each in its own network
namespace, joined by a veth pair, so that tasks, arguments and results cross a real network."""

import contextlib
import os
import secrets
import shutil
import subprocess
import threading
from collections import defaultdict

import psutil
import pytest

from tests.conftest import run, subprocess_env
from tests.netns import ip, kill_namespace, require_namespaces
from tests.test_ray_data import DATA_OUTPUTS

pytestmark = pytest.mark.slow

SUBNET = "10.77.0"
GCS_PORT = 6380
OBJECT_STORE_BYTES = 300_000_000  # per node; Ray's default is 30% of the machine's memory


def start_node(host: str, env: dict, temp_dir: str, *arguments: str) -> None:
    command = ["ip", "netns", "exec", host, "ray", "start", "--num-cpus", "1", "--disable-usage-stats"]
    command += ["--temp-dir", temp_dir]  # not /tmp/ray, where a later ray.init() would find this cluster
    command += ["--object-store-memory", str(OBJECT_STORE_BYTES), *arguments]
    subprocess.run(command, env=env, check=True, capture_output=True)


@pytest.fixture
def two_hosts():
    """The head's address, the environment that reaches it, and the two hosts (network
    namespaces) by role. Token authentication is on, as on any cluster reachable over a network."""
    require_namespaces()
    suffix = secrets.token_hex(3)
    hosts = {"head": f"fw-head-{suffix}", "worker": f"fw-worker-{suffix}"}
    devices = {"head": f"fwh{suffix}", "worker": f"fww{suffix}"}
    addresses = {"head": f"{SUBNET}.1", "worker": f"{SUBNET}.2"}
    env = subprocess_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    temp_dir = f"/tmp/fw-ray-{suffix}"  # short: Ray's socket paths live under it
    try:
        try:
            ip("link", "add", devices["head"], "type", "veth", "peer", "name", devices["worker"])
        except subprocess.CalledProcessError as error:  # a container without CAP_NET_ADMIN
            pytest.skip(f"cannot make a veth pair here: {error.stderr.strip()}")
        for role, host in hosts.items():
            ip("netns", "add", host)
            ip("-n", host, "link", "set", "lo", "up")
            ip("link", "set", devices[role], "netns", host)
            ip("-n", host, "addr", "add", f"{addresses[role]}/24", "dev", devices[role])
            ip("-n", host, "link", "set", devices[role], "up")
        head = f"{addresses['head']}:{GCS_PORT}"
        head_options = ["--head", "--port", str(GCS_PORT), "--include-dashboard=false"]
        start_node(hosts["head"], env, temp_dir, *head_options, "--node-ip-address", addresses["head"])
        start_node(hosts["worker"], env, temp_dir, "--address", head, "--node-ip-address", addresses["worker"])
        yield head, env, hosts
    finally:
        for host in hosts.values():
            kill_namespace(host)
        subprocess.run(["ip", "link", "del", devices["head"]], capture_output=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


class TaskWatcher(threading.Thread):
    """Which Ray tasks ran in which network namespace (its inode), from the worker processes'
    titles ("ray::clean_batch" while one runs)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: dict[int, set[str]] = defaultdict(set)
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            for process in psutil.process_iter(["pid", "cmdline"]):
                title = (process.info["cmdline"] or [""])[0]
                if title.startswith("ray::") and title != "ray::IDLE":
                    with contextlib.suppress(OSError):
                        self.seen[os.stat(f"/proc/{process.info['pid']}/ns/net").st_ino].add(title[5:].split()[0])


def test_the_data_stages_on_two_hosts_write_what_one_process_writes(project_copy, sample_project, two_hosts):
    head, env, hosts = two_hosts
    run(["flywheel", "params", "apply", "runtime.executor=ray", "runtime.ray.partition_rows=300"], project_copy)
    watcher = TaskWatcher()
    watcher.start()
    driver = ["ip", "netns", "exec", hosts["head"], "dvc", "repro", "split"]
    result = subprocess.run(driver, cwd=project_copy, env={**env, "RAY_ADDRESS": head}, capture_output=True, text=True)
    watcher.stopping.set()
    watcher.join()
    assert result.returncode == 0, result.stdout + result.stderr
    for output in DATA_OUTPUTS:
        assert (project_copy / output).read_bytes() == (sample_project / output).read_bytes(), output
    by_host = {role: watcher.seen[os.stat(f"/run/netns/{host}").st_ino] for role, host in hosts.items()}
    # Each host ran the stages' tasks (the quickest, the shuffles' map and reduce tasks, are
    # often over before the watcher looks).
    stage_tasks = {"read_whole_file", "clean_batch", "check_train_records"}
    for role, tasks in by_host.items():
        assert stage_tasks & tasks, (role, by_host)
