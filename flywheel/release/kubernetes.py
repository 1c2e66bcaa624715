"""The kubernetes deploy target: infra/k8s/ rendered with a version's image, replicas, resources
and namespace into build/k8s/<version>/; applied with kubectl and watched until rolled out when
kubectl has a cluster, rendered only if not. The Deployment's readiness probe is the health gate
and the Service the stable endpoint (the local and docker targets' router plays that part).

With serve.engine vllm, each pod runs vLLM's own image as a sidecar beside the gateway, with the
GPU request: an init container copies the version's model out of the gateway's image into a volume
both read, the engine listens on the pod's loopback only, and the gateway proxies to it
(FLYWHEEL_ENGINE_URL). The pod is ready when both are, so a rollout waits for the engine too.
llama.cpp, a CPU engine, runs inside the version's image, as on the docker target.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import yaml

from flywheel.config import Params
from flywheel.errors import FlywheelError, RolloutFailed
from flywheel.io import atomic_path
from flywheel.release import package
from flywheel.release.backends import Release
from flywheel.serving.engine_commands import ENGINE_URL_VARIABLE, VLLM_SERVER_MODULE, vllm_args

TEMPLATES = Path(__file__).resolve().parents[2] / "infra" / "k8s"
RENDERED = Path("build/k8s")
ENGINE_PORT = 8001
ENGINE_MODEL = "/srv/engine-model"
# vLLM's official images, of the release whose CPU build Flywheel is tested with (not pulled here).
VLLM_IMAGES = {"gpu": "vllm/vllm-openai:v0.32.0", "cpu": "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:v0.32.0"}


def render(release: Release, params: Params) -> Path:
    """infra/k8s/*.yaml with the image, replicas, resources and namespace of params.yaml."""
    config = params.deploy.kubernetes
    sidecar = params.serve.engine == "vllm"  # llama.cpp runs inside the version's image
    image = package.image_tag(params.package, release.version)
    out = RENDERED / release.version
    out.mkdir(parents=True, exist_ok=True)
    for template in sorted(TEMPLATES.glob("*.yaml")):
        manifest = yaml.safe_load(template.read_text())
        manifest["metadata"]["namespace"] = config.namespace
        manifest["metadata"].setdefault("labels", {})["flywheel.version"] = release.version
        kind = manifest["kind"]
        if kind == "Deployment":
            spec = manifest["spec"]
            spec["replicas"] = config.replicas
            spec["template"]["metadata"]["labels"]["flywheel.version"] = release.version
            container = spec["template"]["spec"]["containers"][0]
            container["image"] = image
            container["resources"] = _resources(config.cpu, config.memory, config.gpus if not sidecar else 0)
            if config.api_keys_secret:
                container.setdefault("env", []).append(
                    {
                        "name": "FLYWHEEL_API_KEYS",
                        "valueFrom": {"secretKeyRef": {"name": config.api_keys_secret, "key": "api-keys"}},
                    }
                )
            if sidecar:
                _add_engine_sidecar(spec["template"]["spec"], container, params)
        elif kind == "HorizontalPodAutoscaler":
            manifest["spec"]["minReplicas"] = config.replicas
            manifest["spec"]["maxReplicas"] = max(config.max_replicas, config.replicas)
            manifest["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] = config.target_cpu_percent
        with atomic_path(out / template.name) as tmp:
            tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return out


def _resources(cpu: str, memory: str, gpus: int) -> dict:
    resources = {"cpu": cpu, "memory": memory}
    if gpus:
        resources["nvidia.com/gpu"] = gpus
    return {"requests": dict(resources), "limits": dict(resources)}


def _add_engine_sidecar(pod: dict, gateway: dict, params: Params) -> None:
    """vLLM beside the gateway in each pod, with the model copied from the gateway's image."""
    config = params.deploy.kubernetes
    image = config.engine_image or VLLM_IMAGES["gpu" if config.gpus else "cpu"]
    probe = {"httpGet": {"path": "/health", "port": ENGINE_PORT}, "periodSeconds": 5}
    model_volume = {"name": "engine-model", "mountPath": ENGINE_MODEL}
    pod.setdefault("initContainers", []).append(
        {
            "name": "engine-model",
            "image": gateway["image"],
            "command": ["sh", "-c", f"cp -R /srv/model/. {ENGINE_MODEL}/"],
            "volumeMounts": [model_volume],
        }
    )
    pod["containers"].append(
        {
            "name": "engine",
            "image": image,
            "command": ["python3", *VLLM_SERVER_MODULE],
            "args": vllm_args(params.serve, ENGINE_MODEL, "127.0.0.1", ENGINE_PORT),
            "env": _engine_env(config.engine_memory, gpu=bool(config.gpus)),
            "resources": _resources(config.engine_cpu, config.engine_memory, config.gpus),
            "readinessProbe": {**probe, "failureThreshold": 3},
            "startupProbe": {**probe, "failureThreshold": 120},  # loading and compiling: up to 10 minutes
            "volumeMounts": [{**model_volume, "readOnly": True}],
        }
    )
    pod["volumes"].append({"name": "engine-model", "emptyDir": {}})
    gateway.setdefault("env", []).append({"name": ENGINE_URL_VARIABLE, "value": f"http://127.0.0.1:{ENGINE_PORT}"})


def _engine_env(memory: str, gpu: bool) -> list[dict]:
    # The pod's user has no home in vLLM's image: its caches go to a writable place.
    env = {"HOME": "/tmp", "HF_HUB_OFFLINE": "1"}
    if not gpu and memory.endswith("Gi") and memory[:-2].isdigit():
        # On a CPU vLLM takes 92% of the node's memory for its KV cache unless told; half the limit.
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(memory[:-2]) // 2))
    return [{"name": name, "value": value} for name, value in env.items()]


def _kubectl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True)


def cluster_configured() -> bool:
    try:
        return _kubectl("config", "current-context").returncode == 0
    except FileNotFoundError:
        return False


def apply(release: Release, params: Params) -> dict:
    """Render the manifests; with a cluster, apply them and wait for the rollout (undone if it
    fails). The deployment's state, with `applied` saying whether a cluster took it."""
    config = params.deploy.kubernetes
    rendered = render(release, params)
    state = {
        "version": release.version,
        "target": "kubernetes",
        "manifests": str(rendered),
        "registered": release.registered,
        "deployed_at": datetime.now(UTC).isoformat(),
    }
    if not cluster_configured():
        return {**state, "applied": False}  # rendered only: what serves (if anything) is unchanged
    applied = _kubectl("apply", "-n", config.namespace, "-f", str(rendered))
    if applied.returncode != 0:
        raise FlywheelError(f"kubectl apply failed: {applied.stderr.strip()}")
    # The Deployment's readiness probe is the health gate: pods of the new version take traffic
    # from the Service only when ready, and the old ReplicaSet keeps serving until then.
    rolled = _kubectl(
        "rollout", "status", "-n", config.namespace, "deployment/flywheel", f"--timeout={config.rollout_timeout_s}s"
    )
    if rolled.returncode != 0:
        _kubectl("rollout", "undo", "-n", config.namespace, "deployment/flywheel")
        raise RolloutFailed(
            f"rollout of {release.version} did not become ready "
            f"({rolled.stderr.strip() or rolled.stdout.strip()}); rolled back"
        )
    return {**state, "applied": True}


def delete(manifests: Path) -> None:
    if cluster_configured():
        for name in sorted(manifests.glob("*.yaml")):
            _kubectl("delete", "--ignore-not-found", "-f", str(name))
