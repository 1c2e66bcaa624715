"""deploy: a health-gated rollout of one model version (`flywheel deploy [VERSION]`).

  local       a background `flywheel serve` of models/releases/<version>
  docker      a container of the packaged image (`flywheel package` first)
  kubernetes  infra/k8s/ rendered with the image tag into build/k8s/<version>/; applied with
              kubectl and watched until rolled out when kubectl has a cluster, rendered only if not

For local and docker, clients use one stable endpoint (deploy.host:deploy.port), a small router
(flywheel/serving/router.py) in front of the version that serves. A new version starts beside the old
one on a private port, must answer /readyz within deploy.health_timeout_s and then a smoke chat
completion that reports its version; only then does the router send it new connections, the old
one drains and stops, models/production points at it (the evaluate stage compares candidates with
it) and the registry moves the version to `prod`. If any check fails, the new one is stopped, the
old one never stopped serving, and the command fails with the reason.

State: data/serving/deployment.json (what serves, where); logs: data/serving/logs/.
"""

from __future__ import annotations

import json
import os
import shlex
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from flywheel import modeling
from flywheel.config import DeployParams, Params
from flywheel.errors import FlywheelError, RolloutFailed
from flywheel.io import atomic_path, file_lock, write_json
from flywheel.net import listening
from flywheel.release import kubernetes, package, registry
from flywheel.release.backends import (
    LOG_DIR,
    Backend,
    Release,
    alive,
    flywheel_command,
    spawn,
    start_container,
    start_process,
    stop_process,
    tail,
)
from flywheel.serving.auth import client_headers
from flywheel.serving.engine_commands import judged_export

SERVING_DIR = Path("data/serving")
STATE_FILE = SERVING_DIR / "deployment.json"
ROUTE_FILE = SERVING_DIR / "route.json"
PRODUCTION_LINK = Path("models/production")
PRODUCTION_LOCK = Path(".dvc/tmp/flywheel/production.lock")
SWITCH_GRACE_S = 1.0


def resolve(params: Params, version: str | None, model_dir: str | None) -> Release:
    if model_dir:
        path = Path(model_dir)
        if params.serve.engine == "llamacpp":  # a GGUF export, versioned by the model it came from
            return Release(judged_export(path)["source_version"], path, registered=False)
        modeling.require_model(path)
        return Release(modeling.model_version(path), path, registered=False)
    version = version or registry.latest(registry.PROMOTED)
    registry.require_promotable(version, registry.PRODUCTION)
    return Release(version, package.serving_model(params, version), registered=True)


# ---------------------------------------------------------------------------------------------
# The gate: ready, then a smoke query that reports the expected version


def _http(url: str, body: dict | None = None, timeout: float = 10.0) -> tuple[int, dict]:
    headers = {"content-type": "application/json", **client_headers()}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"{}")
        except json.JSONDecodeError:
            return error.code, {}


def wait_ready(backend: Backend, timeout_s: float) -> None:
    url = f"http://127.0.0.1:{backend.port}/readyz"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not backend.alive():
            raise RolloutFailed(f"the new version exited before it was ready:\n{backend.describe_failure()}")
        try:
            status, body = _http(url, timeout=2)
        except (OSError, json.JSONDecodeError):
            status, body = 0, {}
        if status == 200:
            return
        if body.get("status") == "failed":
            raise RolloutFailed(f"the new version could not load its model: {body.get('error')}")
        time.sleep(0.5)
    raise RolloutFailed(f"the new version was not ready within {timeout_s:g} s:\n{backend.describe_failure()}")


def smoke_test(backend: Backend, release: Release, prompt: str) -> str:
    try:
        status, body = _http(
            f"http://127.0.0.1:{backend.port}/v1/chat/completions",
            {"model": release.version, "max_tokens": 16, "messages": [{"role": "user", "content": prompt}]},
            timeout=60,
        )
    except (OSError, json.JSONDecodeError) as error:
        raise RolloutFailed(f"smoke query failed: {error}") from None
    if status != 200:
        raise RolloutFailed(f"smoke query answered {status}: {json.dumps(body)[:300]}")
    served = body.get("system_fingerprint")
    if served != release.version:
        raise RolloutFailed(f"smoke query was answered by version {served!r}, not {release.version!r}")
    try:
        return body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise RolloutFailed(f"smoke query answer is not a chat completion: {json.dumps(body)[:300]}") from None


def verify_endpoint(url: str, release: Release, timeout_s: float = 10.0) -> None:
    """The stable endpoint itself answers with the new version: a deploy reports success only
    for what a client can reach."""
    deadline, seen = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = _http(f"{url}/readyz", timeout=2)
            seen = f"{status} {body.get('status')} (version {body.get('version')})"
            if status == 200 and body.get("version") == release.version:
                return
        except (OSError, json.JSONDecodeError) as error:
            seen = str(error)
        time.sleep(0.2)
    raise RolloutFailed(f"the endpoint {url} does not serve {release.version}: {seen}")


# ---------------------------------------------------------------------------------------------
# The stable endpoint and the switch


def load_state() -> dict | None:
    return json.loads(STATE_FILE.read_text()) if STATE_FILE.is_file() else None


def _router_of(state: dict | None) -> tuple[int | None, float | None]:
    """(pid, start time) of the router a deployment state names."""
    return (state.get("router_pid"), state.get("router_started")) if state else (None, None)


def ensure_router(config: DeployParams, state: dict | None) -> tuple[int, float]:
    """The router's (pid, start time): the running one, else a new one listening on
    deploy.host:deploy.port. A recorded pid now held by another process is not the router."""
    if alive(*_router_of(state)):
        if state.get("url") == _url(config):
            return _router_of(state)
        stop_process(*_router_of(state))  # deploy.host/port changed: move the endpoint
    if listening(config.host, config.port):
        raise FlywheelError(
            f"{config.host}:{config.port} is taken by another program; stop it or set deploy.port in params.yaml"
        )
    log = LOG_DIR / "router.log"
    router = spawn(
        flywheel_command("router", "--host", config.host, "--port", str(config.port), "--route", str(ROUTE_FILE)), log
    )
    deadline = time.monotonic() + 15
    while not listening(config.host, config.port):
        if not alive(*router) or time.monotonic() > deadline:
            raise FlywheelError(f"the router did not start on {config.host}:{config.port}:\n{tail(log)}")
        time.sleep(0.1)
    return router


def switch_route(backend: Backend) -> None:
    with atomic_path(ROUTE_FILE) as tmp:
        tmp.write_text(json.dumps({"backend": f"127.0.0.1:{backend.port}"}) + "\n")


def point_production_at(model_dir: Path) -> None:
    """models/production -> the served model, swapped atomically (a symlink replaced by rename)."""
    PRODUCTION_LINK.parent.mkdir(parents=True, exist_ok=True)
    if PRODUCTION_LINK.exists() and not PRODUCTION_LINK.is_symlink():
        raise FlywheelError(f"{PRODUCTION_LINK} is a directory, not deploy's link; move it away")
    staging = PRODUCTION_LINK.with_name(f".{PRODUCTION_LINK.name}.tmp")
    staging.unlink(missing_ok=True)
    staging.symlink_to(os.path.relpath(model_dir.resolve(), PRODUCTION_LINK.parent.resolve()))
    os.replace(staging, PRODUCTION_LINK)


def _url(config: DeployParams) -> str:
    return f"http://{config.host}:{config.port}"


def _backend_of(state: dict | None) -> Backend | None:
    return Backend(**state["backend"]) if state and state.get("backend") else None


def rollout(release: Release, params: Params, target: str) -> dict:
    config = params.deploy
    previous = load_state()
    router_pid, router_started = ensure_router(config, previous)
    candidate = (start_container if target == "docker" else start_process)(release, params)
    try:
        wait_ready(candidate, config.health_timeout_s)
        answer = smoke_test(candidate, release, config.smoke_prompt)
    except BaseException as failure:
        candidate.stop()
        if isinstance(failure, RolloutFailed):
            kept = (
                f"{previous['version']} keeps serving at {previous['url']}"
                if _backend_of(previous)
                else "nothing was serving before; nothing serves now"
            )
            raise RolloutFailed(f"rollout of {release.version} stopped: {failure}\n{kept}") from None
        raise
    switch_route(candidate)
    old = _backend_of(previous)
    try:
        verify_endpoint(_url(config), release)
    except RolloutFailed as failure:
        if old:
            switch_route(old)
        candidate.stop()
        raise RolloutFailed(f"rollout of {release.version} stopped: {failure}") from None
    state = {
        "version": release.version,
        "target": target,
        "url": _url(config),
        "router_pid": router_pid,
        "router_started": router_started,
        "model_dir": str(release.model_dir),
        "registered": release.registered,
        "backend": candidate.__dict__,
        "deployed_at": datetime.now(UTC).isoformat(),
        "previous_version": previous["version"] if previous else None,
        "smoke_prompt": config.smoke_prompt,
        "smoke_answer": answer,
    }
    write_json(STATE_FILE, state)  # recorded as soon as it serves, so nothing is left untracked
    if old and old.ref != candidate.ref:
        # Connections the router handed to the old version just before the switch may not have
        # sent their request yet; give them a moment before it stops accepting.
        time.sleep(SWITCH_GRACE_S)
        old.stop()
    with file_lock(PRODUCTION_LOCK):  # the link and the registry's stage move together
        point_production_at(release.model_dir)
        if release.registered:
            registry.assign(release.version, registry.PRODUCTION)
    return state


# ---------------------------------------------------------------------------------------------
# Commands


def deploy(params: Params, version: str | None = None, target: str | None = None, model_dir: str | None = None) -> dict:
    target = target or params.deploy.target
    if target == "kubernetes":
        if model_dir:
            raise FlywheelError("the kubernetes target deploys a packaged, registered version, not --model")
        version = version or registry.latest(registry.PROMOTED)
        registry.require_promotable(version, registry.PRODUCTION)
        state = kubernetes.apply(Release(version, package.release_dir(version), True), params)
        if state["applied"]:
            registry.assign(version, registry.PRODUCTION)
            write_json(STATE_FILE, state)
        return state
    if target == "docker" and params.serve.engine == "vllm":
        raise FlywheelError(
            "the docker target's image carries no vLLM (--target kubernetes runs vLLM's own image as a sidecar, "
            "--target local starts it from serve.engine_python); set serve.engine to transformers or llamacpp"
        )
    release = resolve(params, version, model_dir)
    if target == "docker" and not release.registered:
        raise FlywheelError("the docker target deploys a packaged, registered version, not --model")
    return rollout(release, params, target)


def status() -> dict:
    state = load_state()
    if state is None:
        return {"deployed": False}
    if state["target"] == "kubernetes":
        return {"deployed": True, **state}
    try:
        code, body = _http(f"{state['url']}/readyz", timeout=3)
        health = body.get("status", str(code)) if code else "unreachable"
        serving, engine = body.get("version"), body.get("engine")
    except OSError as error:
        health, serving, engine = f"unreachable ({error})", None, None
    return {
        "deployed": True,
        **state,
        "health": health,
        "serving_version": serving,
        "engine": engine,
        "router_alive": alive(*_router_of(state)),
        "backend_alive": Backend(**state["backend"]).alive(),
    }


def undeploy() -> dict:
    state = load_state()
    if state is None:
        return {"stopped": None}
    if state["target"] == "kubernetes":
        if state.get("applied"):
            kubernetes.delete(Path(state["manifests"]))
    else:
        Backend(**state["backend"]).stop()
        stop_process(*_router_of(state))
        ROUTE_FILE.unlink(missing_ok=True)
        if PRODUCTION_LINK.is_symlink():
            PRODUCTION_LINK.unlink()  # nothing serves: evaluate has no production model to compare
    STATE_FILE.unlink()
    return {"stopped": state["version"], "target": state["target"]}


def _running(alive: bool) -> str:
    return "running" if alive else "NOT RUNNING (redeploy: flywheel deploy)"


def serving(state: dict) -> bool:
    """Whether a deployment answers: ready, with its router and backend processes alive (a
    Kubernetes deployment is the cluster's to watch)."""
    if state["target"] == "kubernetes":
        return True
    return state["health"] == "ready" and state["router_alive"] and state["backend_alive"]


def describe_status(state: dict) -> str:
    if not state["deployed"]:
        return "nothing is deployed (flywheel deploy)"
    if state["target"] == "kubernetes":
        return f"{state['version']} on Kubernetes (manifests {state['manifests']}); see kubectl get deploy/flywheel"
    return "\n".join(
        [
            f"version:  {state['version']}" + ("" if state["registered"] else " (not a registered version)"),
            f"target:   {state['target']}",
            f"url:      {state['url']}/v1",
            f"health:   {state['health']}"
            + (f" (serving {state['serving_version']})" if state["serving_version"] else ""),
            f"engine:   {state.get('engine') or 'unknown (not answering)'}",
            f"router:   {_running(state['router_alive'])} (pid {state['router_pid']})",
            f"backend:  {_running(state['backend_alive'])} ({state['backend']['kind']} {state['backend']['ref']})",
            f"since:    {state['deployed_at']}",
            f"model:    {state['model_dir']}",
        ]
    )


def report(state: dict) -> str:
    if state["target"] == "kubernetes":
        if not state.get("applied"):
            return (
                f"rendered {state['version']} for Kubernetes in {state['manifests']} (no cluster configured "
                f"for kubectl: not applied; the registry is unchanged). Apply with "
                f"`kubectl apply -f {state['manifests']}`."
            )
        return f"{state['version']} rolled out on Kubernetes ({state['manifests']}); registry: prod"
    registry_note = "registry: prod" if state["registered"] else "not a registered version: registry unchanged"
    prompt = state.get("smoke_prompt", "Hello")  # a prompt the model was seen to answer
    body = json.dumps({"model": state["version"], "messages": [{"role": "user", "content": prompt}]})
    return "\n".join(
        [
            f"deployed {state['version']} ({state['target']}) at {state['url']} "
            f"(replaced {state['previous_version'] or 'nothing'}); {registry_note}",
            f"smoke answer: {state['smoke_answer']!r}",
            "query it:",
            f"  curl {state['url']}/v1/chat/completions -H 'content-type: application/json' -d {shlex.quote(body)}",
            f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{state['url']}/v1', api_key='unused'); "
            f"print(c.chat.completions.create(model='{state['version']}', messages=[{{'role': 'user', "
            f"'content': {prompt!r}}}]).choices[0].message.content)\"",
            "status: flywheel status; stop: flywheel undeploy",
        ]
    )
