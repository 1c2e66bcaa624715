"""The data stages on Ray: the same outputs as in one process, on a real local cluster."""

import concurrent.futures
import random
import time

import psutil
import pytest

from flywheel import paths
from flywheel.data import clean
from tests.conftest import run
from tests.helpers import read_rows, record, repo_params, write_records

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    # address="local": a new cluster, whatever `ray start` left on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def planted_corpus(originals: int, seed: int = 0) -> list[dict]:
    """Distinct notes, a third with near copies (a few words changed) and a tenth with exact
    copies (case and spacing changed), shuffled, with some records every filter removes."""
    rng = random.Random(seed)
    vocabulary = [f"{rng.choice('bcdfgklmnprst')}{rng.choice('aeiou')}{rng.choice('lmnrst')}{n}" for n in range(3000)]
    records = []
    for n in range(originals):
        words = rng.choices(vocabulary, k=rng.randint(40, 70))
        prompt = f"Summarise note {n} for the team."
        records.append(record(prompt, " ".join(words)))
        if rng.random() < 1 / 3:
            for _ in range(rng.randint(1, 2)):
                edited = [rng.choice(vocabulary) if rng.random() < 0.03 else word for word in words]
                records.append(record(prompt, " ".join(edited)))
        if rng.random() < 0.1:
            records.append(record(prompt.upper(), "  ".join(words).upper()))
    records += [record("Say hi", "<p> </p>"), record("Garbage?", "#### $$$ %%% &&& *** !!! ??? @@@")]
    rng.shuffle(records)
    return records


def run_clean(root, records, runtime):
    write_records(root / paths.INGESTED_RECORDS, records)
    metrics = clean.run(repo_params(runtime=runtime), root=root)
    return metrics, read_rows(root / paths.CLEAN_RECORDS), read_rows(root / paths.CLEAN_REMOVED)


def test_clean_on_ray_keeps_and_removes_the_same_records_as_locally(tmp_path, ray_cluster):
    records = planted_corpus(600)
    local = run_clean(tmp_path / "local", records, {"executor": "local"})
    # Small partitions: many map tasks, and near duplicates whose originals are in another one.
    on_ray = run_clean(tmp_path / "ray", records, {"executor": "ray", "ray": {"partition_rows": 97}})

    (local_metrics, local_kept, local_removed), (ray_metrics, ray_kept, ray_removed) = local, on_ray
    assert ray_metrics == local_metrics
    assert ray_kept == local_kept
    assert ray_removed == local_removed
    reasons = local_metrics["removed_by_reason"]
    assert reasons["near_duplicate"] > 100 and reasons["exact_duplicate"] > 30
    assert {"empty_response", "symbol_ratio"} <= set(reasons)


DATA_OUTPUTS = (
    paths.INGESTED_RECORDS,
    paths.INGESTED_PREFERENCES,
    paths.QUARANTINE,
    paths.CLEAN_RECORDS,
    paths.CLEAN_REMOVED,
    *paths.SPLITS.values(),
    paths.DECONTAMINATED,
)


def test_dvc_repro_of_the_data_stages_on_a_running_cluster_writes_what_local_writes(
    project_copy, sample_project, ray_cluster
):
    """The stages join the cluster at RAY_ADDRESS, as they would a KubeRay or `ray start` one."""
    address = ray_cluster.get_runtime_context().gcs_address
    run(["flywheel", "params", "apply", "runtime.executor=ray", "runtime.ray.partition_rows=300"], project_copy)
    run(["dvc", "repro", "split"], project_copy, RAY_ADDRESS=address)
    for output in DATA_OUTPUTS:
        assert (project_copy / output).read_bytes() == (sample_project / output).read_bytes(), output


def test_an_unreachable_cluster_is_a_clear_error_naming_its_address(project_copy):
    run(["flywheel", "ingest"], project_copy)
    run(["flywheel", "params", "apply", "runtime.executor=ray"], project_copy)
    result = run(["flywheel", "clean"], project_copy, check=False, RAY_ADDRESS="127.0.0.1:1")
    assert result.returncode != 0
    assert "nothing listens at '127.0.0.1:1' (runtime.ray.address or RAY_ADDRESS)" in result.stderr
    assert "Traceback" not in result.stderr


def kill_first_worker_running(task_name: str, timeout: float = 60) -> int | None:
    """SIGKILL the first Ray worker seen executing `task_name`; its pid, or None if none ran."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in psutil.process_iter(["pid", "cmdline"]):
            if any(part.startswith(f"ray::{task_name}") for part in process.info["cmdline"] or ()):
                process.kill()
                return process.info["pid"]
        time.sleep(0.05)
    return None


def test_a_worker_killed_mid_stage_is_retried_and_the_output_is_the_same(tmp_path, ray_cluster):
    records = planted_corpus(3000, seed=1)
    local = run_clean(tmp_path / "local", records, {"executor": "local"})
    with concurrent.futures.ThreadPoolExecutor(1) as killer:
        killed = killer.submit(kill_first_worker_running, "clean_batch")
        on_ray = run_clean(tmp_path / "ray", records, {"executor": "ray", "ray": {"partition_rows": 200}})
    assert killed.result() is not None, "no worker ran clean_batch while the stage ran"
    assert on_ray == local
