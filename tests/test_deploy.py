"""package and deploy on registered versions of the fine-tuned sample model, in a real git + DVC
repository: health-gated local rollouts through the stable endpoint (queried with the openai
client), a broken version rolled back, a rejected one refused, the image built, run and queried
on a real Docker engine, and Kubernetes manifests rendered."""

import json
import os
import shutil
import subprocess
import threading
import time

import pytest
import yaml

from tests.conftest import BIN, REPO, free_port, run

openai = pytest.importorskip("openai")

FLYWHEEL = str(BIN / "flywheel")
OFFLINE_BASE_IMAGE = "flywheel-base:bookworm"  # what `make docker-base` builds


def _git(repo, *args):
    run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], repo)


def _add_version(repo, model, *, passed=True) -> str:
    """Commit `model` as models/aligned (tracked by DVC) with a gate decision; register it."""
    shutil.rmtree(repo / "models/aligned", ignore_errors=True)
    shutil.copytree(model, repo / "models/aligned")
    run(["dvc", "add", "-q", "models/aligned"], repo)
    gate = {
        "passed": passed,
        "decision": "staging" if passed else "rejected",
        "judged_against": "absolute thresholds",
        "reasons": [] if passed else ["exact_match is 0.000, below the minimum 0.6"],
    }
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/gate.json").write_text(json.dumps(gate))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", f"evaluated run ({'passed' if passed else 'rejected'})")
    registered = run([FLYWHEEL, "models", "register"], repo).stdout
    return registered.split(" registered ")[1].split()[0]


def _broken_copy(model, target):
    """Config and tokenizer intact, weights truncated: loads nothing."""
    shutil.copytree(model, target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return target


@pytest.fixture(scope="module")
def release_repo(trained_sft, tmp_path_factory):
    """A project repository with four registered versions: v0.0.1 the fine-tuned sample model,
    v0.0.2 a broken copy the gate (forced) passed, v0.0.3 the good model again, v0.0.4 rejected."""
    root = tmp_path_factory.mktemp("release")
    repo = root / "project"
    repo.mkdir()
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    shutil.copy(REPO / "params.yaml", repo / "params.yaml")
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"artifacts": {"flywheel-model": {"path": "models/aligned", "type": "model"}}})
    )
    (repo / ".gitignore").write_text("/data/serving/\n/models/releases/\n/models/production\n/build/\n")
    run(
        [
            FLYWHEEL,
            "params",
            "apply",
            f"deploy.port={free_port()}",
            "deploy.health_timeout_s=120",
            f"package.base_image={OFFLINE_BASE_IMAGE}",
            f"package.wheelhouse={REPO / '.cache/wheelhouse'}",
        ],
        repo,
    )
    good = trained_sft / "models/sft"
    versions = [
        _add_version(repo, good),
        _add_version(repo, _broken_copy(good, root / "broken")),
        _add_version(repo, good),
        _add_version(repo, good, passed=False),
    ]
    assert versions == ["v0.0.1", "v0.0.2", "v0.0.3", "v0.0.4"]
    return repo


def _stages(repo) -> dict[str, list[str]]:
    listed = json.loads(run([FLYWHEEL, "models", "--json"], repo).stdout)
    return {entry["version"]: entry["stages"] for entry in listed}


def _state(repo) -> dict:
    return json.loads(run([FLYWHEEL, "status", "--json"], repo, check=False).stdout)


def _ask(url: str, **options) -> "openai.types.chat.ChatCompletion":
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)
    return client.chat.completions.create(
        model="flywheel-model",
        max_tokens=8,
        **options,
        messages=[{"role": "user", "content": "Translate to French: red cat"}],
    )


def test_local_rollouts_are_health_gated_and_a_broken_version_is_rolled_back(release_repo):
    repo = release_repo
    first = run([FLYWHEEL, "deploy", "v0.0.1"], repo)
    assert "deployed v0.0.1 (local)" in first.stdout and "registry: prod" in first.stdout
    state = _state(repo)
    url = state["url"]
    assert state["health"] == "ready" and state["serving_version"] == "v0.0.1" and state["engine"] == "transformers"
    assert "prod" in _stages(repo)["v0.0.1"]
    assert (repo / "models/production").resolve() == (repo / "models/releases/v0.0.1").resolve()

    answer = _ask(url)
    assert answer.system_fingerprint == "v0.0.1" and answer.choices[0].message.content == "rouge chat"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in _ask(url, stream=True) if chunk.choices)
    assert streamed == "rouge chat"

    # A broken version: it never gets ready, the old one never stops serving, no prod for it.
    broken = run([FLYWHEEL, "deploy", "v0.0.2"], repo, check=False)
    assert broken.returncode == 2
    assert "rollout of v0.0.2 stopped" in broken.stderr and "could not load its model" in broken.stderr
    assert "v0.0.1 keeps serving" in broken.stderr
    assert _ask(url).system_fingerprint == "v0.0.1"
    assert "prod" not in _stages(repo)["v0.0.2"]
    assert _state(repo)["version"] == "v0.0.1"

    # A good new version takes over while clients keep asking: nobody sees an error.
    seen, failures, done = [], [], threading.Event()

    def keep_asking():
        while not done.is_set():
            try:
                seen.append(_ask(url).system_fingerprint)
            except Exception as error:  # noqa: BLE001 - every failure is the finding
                failures.append(repr(error))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        old_backend = int(_state(repo)["backend"]["ref"])
        run([FLYWHEEL, "deploy", "v0.0.3"], repo)
        time.sleep(1)
    finally:
        done.set()
        asker.join()
    assert failures == []
    assert seen[0] == "v0.0.1" and seen[-1] == "v0.0.3" and len(seen) > 5
    with pytest.raises(ProcessLookupError):
        os.kill(old_backend, 0)  # drained and stopped
    assert _state(repo)["previous_version"] == "v0.0.1"
    assert "prod" in _stages(repo)["v0.0.3"]

    rejected = run([FLYWHEEL, "deploy", "v0.0.4"], repo, check=False)
    assert rejected.returncode == 2 and "rejected by the promotion gate" in rejected.stderr
    assert _ask(url).system_fingerprint == "v0.0.3"

    assert "stopped v0.0.3 (local)" in run([FLYWHEEL, "undeploy"], repo).stdout
    status = run([FLYWHEEL, "status"], repo, check=False)
    assert status.returncode == 1 and "nothing is deployed" in status.stdout
    with pytest.raises(openai.APIConnectionError):
        _ask(url)


def test_kubernetes_manifests_are_rendered_with_the_version_and_resources(release_repo, tmp_path):
    repo = tmp_path / "project"
    shutil.copytree(release_repo, repo, symlinks=True)
    run(
        [
            FLYWHEEL,
            "params",
            "apply",
            "deploy.kubernetes.replicas=3",
            "deploy.kubernetes.gpus=1",
            "deploy.kubernetes.namespace=serving",
            "deploy.kubernetes.api_keys_secret=flywheel-keys",
        ],
        repo,
    )
    result = run(
        [FLYWHEEL, "deploy", "v0.0.1", "--target", "kubernetes"], repo, PATH=f"{BIN}:/usr/bin:/bin"
    )  # no kubectl: rendered only
    assert "not applied" in result.stdout
    rendered = {path.stem: yaml.safe_load(path.read_text()) for path in (repo / "build/k8s/v0.0.1").glob("*.yaml")}
    deployment, service, hpa = rendered["deployment"], rendered["service"], rendered["hpa"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert container["image"] == "flywheel-model:v0.0.1"
    assert deployment["spec"]["replicas"] == 3 and deployment["metadata"]["namespace"] == "serving"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "flywheel-keys", "key": "api-keys"}
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert hpa["spec"]["minReplicas"] == 3 and hpa["spec"]["scaleTargetRef"]["name"] == "flywheel"
    assert "prod" not in _stages(repo)["v0.0.1"]  # rendered is not deployed
    assert "nothing is deployed" in run([FLYWHEEL, "status"], repo, check=False).stdout

    # vLLM as a sidecar in each pod, holding the GPU; the gateway proxies to it on the pod's loopback.
    run([FLYWHEEL, "params", "apply", "serve.engine=vllm", 'serve.engine_args=["--dtype", "bfloat16"]'], repo)
    run([FLYWHEEL, "deploy", "v0.0.1", "--target", "kubernetes"], repo, PATH=f"{BIN}:/usr/bin:/bin")
    pod = yaml.safe_load((repo / "build/k8s/v0.0.1/deployment.yaml").read_text())["spec"]["template"]["spec"]
    gateway, engine = pod["containers"]
    assert "nvidia.com/gpu" not in gateway["resources"]["limits"]
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert engine["image"].startswith("vllm/vllm-openai:") and engine["args"][-2:] == ["--dtype", "bfloat16"]
    assert engine["args"][:4] == ["--model", "/srv/engine-model", "--served-model-name", "flywheel-engine"]
    assert {"name": "FLYWHEEL_ENGINE_URL", "value": "http://127.0.0.1:8001"} in gateway["env"]
    assert engine["readinessProbe"]["httpGet"] == {"path": "/health", "port": 8001}
    assert pod["initContainers"][0]["image"] == "flywheel-model:v0.0.1"  # the model comes out of the version's image
    refused = run([FLYWHEEL, "deploy", "v0.0.1", "--target", "docker"], repo, check=False)
    assert refused.returncode != 0 and "image carries no vLLM" in refused.stderr


def test_packaging_without_a_docker_engine_says_how_to_get_one(release_repo, tmp_path):
    result = run(
        [FLYWHEEL, "package", "v0.0.1"], release_repo, check=False, DOCKER_HOST=f"unix://{tmp_path}/no-engine.sock"
    )
    assert result.returncode == 2
    assert "no Docker engine answers" in result.stderr and "DOCKER_HOST" in result.stderr
    assert "--target local" in result.stderr


@pytest.mark.docker
def test_the_image_is_built_hermetically_runs_as_non_root_and_answers(release_repo, tmp_path):
    docker = pytest.importorskip("docker")
    repo = tmp_path / "project"
    shutil.copytree(release_repo, repo, symlinks=True)
    # Its own image name: the engine may be a developer's, holding their real flywheel-model tags.
    run([FLYWHEEL, "params", "apply", f"deploy.port={free_port()}", "package.image=flywheel-test-model"], repo)

    built = run([FLYWHEEL, "package", "v0.0.1"], repo)
    assert "built flywheel-test-model:v0.0.1" in built.stdout
    record = json.loads((repo / "build/package/v0.0.1.json").read_text())
    assert record["tag"] == "flywheel-test-model:v0.0.1" and record["size_bytes"] > 100e6
    engine = docker.from_env()
    image = engine.images.get(record["image_id"])
    assert image.attrs["Config"]["User"] == "flywheel"
    assert "readyz" in " ".join(image.attrs["Config"]["Healthcheck"]["Test"])
    assert image.labels["org.opencontainers.image.version"] == "v0.0.1"

    deployed = run([FLYWHEEL, "deploy", "v0.0.1", "--target", "docker"], repo)
    try:
        assert "deployed v0.0.1 (docker)" in deployed.stdout
        assert "prod" in _stages(repo)["v0.0.1"]  # also after v0.0.3 was: a rollback re-promotes
        state = _state(repo)
        answer = _ask(state["url"])
        assert answer.system_fingerprint == "v0.0.1" and answer.choices[0].message.content == "rouge chat"
        container = engine.containers.get(state["backend"]["ref"])
        deadline = time.monotonic() + 60
        while container.attrs["State"]["Health"]["Status"] != "healthy" and time.monotonic() < deadline:
            time.sleep(2)
            container.reload()
        assert container.attrs["State"]["Health"]["Status"] == "healthy"
        assert container.exec_run("id -u").output.decode().strip() == "10001"
    finally:
        run([FLYWHEEL, "undeploy"], repo)
    with pytest.raises(docker.errors.NotFound):
        engine.containers.get(state["backend"]["ref"])
    engine.images.remove(record["tag"])


@pytest.mark.docker
@pytest.mark.llamacpp
def test_a_version_served_8_bit_by_llama_cpp_ships_in_its_image_once_the_gate_judged_it(
    release_repo, trained_sft, tmp_path
):
    docker = pytest.importorskip("docker")
    repo = tmp_path / "project"
    shutil.copytree(release_repo, repo, symlinks=True)
    for bench in ("data/processed", "data/eval"):  # the gate's test split and safety probe
        shutil.copytree(trained_sft / bench, repo / bench)
    settings = [f"deploy.port={free_port()}", "package.image=flywheel-test-model", "serve.engine=llamacpp"]
    settings += ["evaluate.test_examples=40", "evaluate.latency_examples=2"]
    run([FLYWHEEL, "params", "apply", *settings], repo)
    server = {"FLYWHEEL_LLAMACPP_SERVER": str(REPO / ".llama.cpp/bin/llama-server")}  # make engine-llamacpp's
    unjudged = run([FLYWHEEL, "package", "v0.0.3"], repo, check=False, **server)
    assert unjudged.returncode != 0 and "flywheel export --version v0.0.3" in unjudged.stdout + unjudged.stderr

    assert "gate: passed" in run([FLYWHEEL, "export", "--version", "v0.0.3"], repo).stdout
    assert "built flywheel-test-model:v0.0.3" in run([FLYWHEEL, "package", "v0.0.3"], repo, **server).stdout
    record = json.loads((repo / "build/package/v0.0.3.json").read_text())
    assert record["engine"] == "llamacpp" and record["model_dir"].endswith("v0.0.3-q8_0")
    deployed = run([FLYWHEEL, "deploy", "v0.0.3", "--target", "docker"], repo)
    try:
        assert "deployed v0.0.3 (docker)" in deployed.stdout
        answer = _ask(_state(repo)["url"])
        assert answer.system_fingerprint == "v0.0.3" and answer.choices[0].message.content == "rouge chat"
        assert "engine:   llamacpp" in run([FLYWHEEL, "status"], repo).stdout
    finally:
        run([FLYWHEEL, "undeploy"], repo)
    docker.from_env().images.remove(record["tag"])


def test_pids_that_now_belong_to_other_processes_are_never_signalled(tmp_path):
    # After a reboot or pid reuse, deployment.json names processes deploy never started.
    import psutil

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    strangers = [subprocess.Popen(["sleep", "120"]) for _ in range(2)]
    try:
        router, backend = (process.pid for process in strangers)
        state = {
            "version": "v0.0.9",
            "target": "local",
            "url": f"http://127.0.0.1:{free_port()}",
            "router_pid": router,
            "router_started": psutil.Process(router).create_time() - 3600,  # the router deploy started, an hour earlier
            "model_dir": "models/releases/v0.0.9",
            "deployed_at": "2026-11-29T08:00:00+00:00",
            "registered": True,
            "backend": {"kind": "process", "port": free_port(), "ref": str(backend), "log": "x.log"},
        }
        (tmp_path / "data/serving").mkdir(parents=True)
        (tmp_path / "data/serving/deployment.json").write_text(json.dumps(state))
        status = json.loads(run([FLYWHEEL, "status", "--json"], tmp_path, check=False).stdout)
        assert status["router_alive"] is False and status["backend_alive"] is False
        # Deployed but not serving: said so, and a non-zero exit a probe can act on (it used to exit 0).
        described = run([FLYWHEEL, "status"], tmp_path, check=False)
        assert described.returncode == 3 and "backend:  NOT RUNNING" in described.stdout
        assert "stopped v0.0.9" in run([FLYWHEEL, "undeploy"], tmp_path).stdout
        assert [process.poll() for process in strangers] == [None, None]  # both still running
    finally:
        for process in strangers:
            process.kill()
            process.wait()
