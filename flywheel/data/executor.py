"""Where the data stages' work runs: in this process, or as tasks on a Ray cluster.

`runtime.executor` picks one; the stages ask it to map a function over partitions of their input
and get the results back in input order, whichever runs them, so `local` and `ray` write the same
outputs. Ray retries a task whose worker died (the functions are pure: a retry computes the same
result) and carries arguments and results through its object store, so a worker on another node
needs no shared filesystem.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from flywheel import net, threads
from flywheel.errors import FlywheelError

if TYPE_CHECKING:
    from flywheel.config import RayParams, RuntimeParams

# One task per CPU: a task's numpy, rensa and torch pools get one thread, whatever the driver has.
WORKER_ENV = {variable: "1" for variable in threads.POOL_VARIABLES}
TASKS_IN_FLIGHT_PER_CPU = 2  # enough to keep every CPU busy; few enough to bound the driver's memory


class Executor(Protocol):
    name: str

    def map(self, function: Callable, items: Iterable, *shared: Any) -> Iterator: ...

    def batch_rows(self, local_rows: int) -> int: ...


class LocalExecutor:
    name = "local"

    def batch_rows(self, local_rows: int) -> int:
        return local_rows

    def map(self, function: Callable, items: Iterable, *shared: Any) -> Iterator:
        for item in items:
            yield function(item, *shared)


class RayExecutor:
    name = "ray"

    def __init__(self, partition_rows: int) -> None:
        import ray

        self._ray = ray
        self.partition_rows = partition_rows

    def batch_rows(self, local_rows: int) -> int:
        """Rows per task: runtime.ray.partition_rows, what bounds a worker's memory."""
        return self.partition_rows

    def cpus(self) -> int:
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def map(self, function: Callable, items: Iterable, *shared: Any) -> Iterator:
        """function(item, *shared) for each item as a Ray task, results in input order. At most a
        few tasks per CPU are in flight, so the items are read (and held) only as fast as the
        cluster computes."""
        ray = self._ray
        task = ray.remote(function)
        shared_refs = [ray.put(value) for value in shared]  # sent to the object store once
        pending: deque = deque()
        window = TASKS_IN_FLIGHT_PER_CPU * self.cpus()
        for item in items:
            pending.append(task.remote(item, *shared_refs))
            if len(pending) >= window:
                yield ray.get(pending.popleft())
        while pending:
            yield ray.get(pending.popleft())


def ray_address(config: RayParams) -> str | None:
    return config.address or os.environ.get("RAY_ADDRESS") or None


def _check_reachable(address: str) -> None:
    """Fail in a second on an address nothing listens at: ray.init retries one for ten minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if address == "auto" or not port.isdigit():
        return  # ray.init finds (or names) the cluster itself
    if not net.listening(host or "127.0.0.1", int(port)):
        raise FlywheelError(
            f"runtime.executor is ray, but nothing listens at {address!r} (runtime.ray.address or RAY_ADDRESS). "
            "Start a cluster there (`ray start --head`), fix the address, or set runtime.executor: local"
        )


def _connect(config: RayParams) -> bool:
    """Join the configured cluster or start a local one; False where this process already had a
    Ray session (a notebook, a test's cluster), which is then used as it is."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address(config)
    runtime_env = {"env_vars": WORKER_ENV}
    if address:
        _check_reachable(address)
    try:
        if address:
            ray.init(address=address, runtime_env=runtime_env, logging_level="ERROR", log_to_driver=False)
        else:
            ray.init(
                address="local",  # a new cluster, even where `ray start` left one running on this machine
                num_cpus=threads.available_cpus(),
                include_dashboard=False,
                runtime_env=runtime_env,
                logging_level="ERROR",
                log_to_driver=False,
            )
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as error:
        where = f"at {address!r} (runtime.ray.address or RAY_ADDRESS)" if address else "on this machine"
        raise FlywheelError(
            f"runtime.executor is ray, but no Ray cluster could be reached {where}: {error}. Start one "
            "(`ray start --head`), fix the address, or set runtime.executor: local"
        ) from error
    return True


@contextlib.contextmanager
def open_executor(runtime: RuntimeParams) -> Iterator[Executor]:
    if runtime.executor == "local":
        yield LocalExecutor()
        return
    connected_here = _connect(runtime.ray)
    try:
        yield RayExecutor(runtime.ray.partition_rows)
    finally:
        if connected_here:
            import ray

            ray.shutdown()
