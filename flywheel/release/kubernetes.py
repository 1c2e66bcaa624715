"""The kubernetes deploy target: infra/k8s/ rendered with a version's image, replicas, resources
and namespace into build/k8s/<version>/; applied with kubectl and watched until rolled out when
kubectl has a cluster, rendered only if not. The Deployment's readiness probe is the health gate
and the Service the stable endpoint (the local and docker targets' router plays that part).
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

TEMPLATES = Path(__file__).resolve().parents[2] / "infra" / "k8s"
RENDERED = Path("build/k8s")


def render(release: Release, params: Params) -> Path:
    """infra/k8s/*.yaml with the image, replicas, resources and namespace of params.yaml."""
    config = params.deploy.kubernetes
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
            resources = {"cpu": config.cpu, "memory": config.memory}
            if config.gpus:
                resources["nvidia.com/gpu"] = config.gpus
            container["resources"] = {"requests": dict(resources), "limits": dict(resources)}
            if config.api_keys_secret:
                container.setdefault("env", []).append(
                    {
                        "name": "FLYWHEEL_API_KEYS",
                        "valueFrom": {"secretKeyRef": {"name": config.api_keys_secret, "key": "api-keys"}},
                    }
                )
        elif kind == "HorizontalPodAutoscaler":
            manifest["spec"]["minReplicas"] = config.replicas
            manifest["spec"]["maxReplicas"] = max(config.max_replicas, config.replicas)
            manifest["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] = config.target_cpu_percent
        with atomic_path(out / template.name) as tmp:
            tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return out


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
