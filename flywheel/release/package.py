"""package: the serving image of one registered model version (`flywheel package [VERSION]`).

The image is built from infra/docker/Dockerfile with the Docker SDK and tagged
`<package.image>:<version>`. The build is hermetic: the serving dependencies, pinned to the
versions installed here (the ones the tests ran against), are assembled as wheels on the host, so
the Docker build fetches nothing. The image id, tag and size go to build/package/<version>.json.

Package and deploy act on registered versions (git tags made after the evaluated run is
committed), so they are commands of their own rather than `dvc.yaml` stages: a stage's outputs
feed dvc.lock, and the version is a tag on the commit that holds dvc.lock.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from flywheel import paths
from flywheel.config import PackageParams, Params, source_file
from flywheel.errors import FlywheelError
from flywheel.io import atomic_dir, write_json
from flywheel.release import registry
from flywheel.serving.engine_commands import judged_export, llamacpp_server

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the project's own source, built as a wheel
DOCKERFILE = SOURCE_ROOT / "infra" / "docker" / "Dockerfile"
RELEASES_DIR = Path("models/releases")
RECORDS_DIR = Path("build/package")
MODEL_BAKED_LABEL = "flywheel.model-baked-in"  # "true" or "false"; deploy mounts the model if false
PRIVATE_ENGINE = Path(".docker/docker.sock")  # what `make docker-engine` starts
# What `flywheel serve` imports, and nothing else: no Airflow, DVC or trainers in the image.
SERVING_DISTRIBUTIONS = (
    "torch",
    "transformers",
    "fastapi",
    "uvicorn",
    "httpx",
    "pydantic",
    "pyyaml",
    "sqlalchemy",
    "psycopg[binary]",
    "prometheus-client",
    "pyarrow",
)
NO_ENGINE = (
    "no Docker engine answers{where}. Point DOCKER_HOST at one (e.g. "
    "DOCKER_HOST=unix:///var/run/docker.sock), start a private one with `make docker-engine`, "
    "or deploy without a container: `flywheel deploy --target local`."
)


# ---------------------------------------------------------------------------------------------
# The engine


def docker_client():
    """A client for DOCKER_HOST if set, else the private engine of `make docker-engine`, else
    the default socket; one clear message when none answers."""
    import docker
    from docker.errors import DockerException

    if os.environ.get("DOCKER_HOST"):
        candidates = [os.environ["DOCKER_HOST"]]  # named explicitly: no silent fallback
    else:
        candidates = [f"unix://{PRIVATE_ENGINE.resolve()}"] if PRIVATE_ENGINE.exists() else []
        candidates.append("unix:///var/run/docker.sock")
    for url in candidates:
        try:
            client = docker.DockerClient(base_url=url, version="auto", timeout=600)
            client.ping()
            return client
        except DockerException:
            continue
    raise FlywheelError(NO_ENGINE.format(where=f" (tried {', '.join(candidates)})"))


# ---------------------------------------------------------------------------------------------
# Inputs: the model and the wheelhouse


def release_dir(version: str) -> Path:
    return RELEASES_DIR / version


def materialise(version: str) -> Path:
    """models/releases/<version>: the version's model files, its version in lineage.json (what
    `flywheel serve` reports as the model version)."""
    target = release_dir(version)
    if (target / "lineage.json").is_file() and json.loads((target / "lineage.json").read_text()).get(
        "version"
    ) == version:
        return target
    with atomic_dir(target) as staging:
        registry.fetch(version, staging / "model")
        for item in (staging / "model").iterdir():
            item.rename(staging / item.name)
        (staging / "model").rmdir()
        lineage_file = staging / "lineage.json"
        lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
        lineage_file.write_text(json.dumps({**lineage, "version": version}, indent=2) + "\n")
        readable_by_all(staging)
    return target


def release_export(version: str) -> Path:
    """Where `flywheel export --version V` writes V's 8-bit export, which llama.cpp serves."""
    return RELEASES_DIR / f"{version}-q8_0"


def serving_model(params: Params, version: str) -> Path:
    """What serves `version`: its model, or for serve.engine llamacpp its 8-bit export, which the
    gate must have judged (`flywheel export --version`: exporting and judging are not deploy's)."""
    model = materialise(version)
    if params.serve.engine != "llamacpp":
        return model
    target = release_export(version)
    how = f"`flywheel export --version {version}` writes it and the gate judges it"
    if not (target / paths.EXPORT_DESCRIPTION).is_file():
        raise FlywheelError(f"serve.engine llamacpp serves the 8-bit export of {version}, and there is none: {how}")
    if judged_export(target).get("gate") != "passed":
        raise FlywheelError(f"the 8-bit export of {version} was never judged by the gate: {how}")
    readable_by_all(target)
    return target


def engine_server(params: Params) -> Path | None:
    """The engine's server the image carries: llama.cpp's, built here (make engine-llamacpp). An
    image holds no vLLM: on Kubernetes vLLM runs beside the gateway as a sidecar of its own image."""
    return llamacpp_server(params.serve) if params.serve.engine == "llamacpp" else None


def readable_by_all(directory: Path) -> None:
    """The server runs as an unprivileged user; trainers may write weights as 0600."""
    for item in directory.rglob("*"):
        item.chmod(0o755 if item.is_dir() else 0o644)


def serving_requirements() -> list[str]:
    """The serving distributions pinned to the versions installed here."""
    pins = []
    for requirement in SERVING_DISTRIBUTIONS:
        name = requirement.split("[")[0]
        try:
            pins.append(f"{requirement}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise FlywheelError(f"{name} is not installed here; run `make install`") from None
    return pins


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def wheelhouse(config: PackageParams) -> Path:
    """Wheels for the serving requirements and their dependencies, every one pinned to what is
    installed here (pip freeze as constraints). Kept under a key of the pins, so an unchanged
    environment reuses it."""
    requirements = "\n".join(serving_requirements()) + "\n"
    frozen = _pip("freeze", "--exclude-editable")
    if frozen.returncode != 0:
        raise FlywheelError(f"pip freeze failed: {frozen.stderr.strip()}")
    # flywheel itself is built from source into the context (project_wheel), not pinned here.
    constraints = (
        "\n".join(line for line in frozen.stdout.splitlines() if line and not line.startswith(("-e", "#", "flywheel")))
        + "\n"
    )
    key = hashlib.sha256((requirements + constraints).encode()).hexdigest()[:16]
    house = Path(config.wheelhouse) / key
    if (house / "requirements.txt").is_file():
        return house
    with atomic_dir(house) as staging:
        (staging / "constraints.txt").write_text(constraints)
        (staging / "requirements-in.txt").write_text(requirements)
        built = _pip(
            "wheel",
            "--quiet",
            "-w",
            str(staging),
            "-r",
            str(staging / "requirements-in.txt"),
            "-c",
            str(staging / "constraints.txt"),
        )
        if built.returncode != 0:
            raise FlywheelError(f"building the wheelhouse failed:\n{built.stderr.strip()[-2000:]}")
        (staging / "requirements.txt").write_text(requirements)
    return house


def project_wheel(out: Path) -> None:
    """The flywheel wheel, from this source tree."""
    built = _pip("wheel", "--quiet", "--no-deps", "-w", str(out), str(SOURCE_ROOT))
    if built.returncode != 0:
        raise FlywheelError(f"building the flywheel wheel failed:\n{built.stderr.strip()[-2000:]}")


# ---------------------------------------------------------------------------------------------
# The build


def _link_tree(source: Path, target: Path) -> None:
    """Hard links where the filesystem allows (the wheelhouse is hundreds of MB), else copies.
    Only for files read as root during the build: a link shares its source's permissions."""
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_dir():
            _link_tree(item, target / item.name)
            continue
        try:
            os.link(item, target / item.name)
        except OSError:
            shutil.copy2(item, target / item.name)


def build_context(
    context: Path, house: Path, model: Path, params_file: Path, bake_model: bool, engine: Path | None
) -> None:
    """Dockerfile, wheelhouse/, project/ (the flywheel wheel), engine/, model/ and params.yaml."""
    shutil.copy(DOCKERFILE, context / "Dockerfile")
    (context / "engine").mkdir()
    if engine is not None:
        shutil.copy(engine, context / "engine" / "llama-server")
    _link_tree(house, context / "wheelhouse")
    for unused in ("constraints.txt", "requirements-in.txt"):
        (context / "wheelhouse" / unused).unlink(missing_ok=True)
    project_wheel(context / "project")
    (context / "model").mkdir()
    if bake_model:
        shutil.copytree(model, context / "model", dirs_exist_ok=True)
        readable_by_all(context / "model")
    shutil.copy(params_file, context / "params.yaml")
    (context / "params.yaml").chmod(0o644)  # read by the server's unprivileged user


def require_base_image(client, base_image: str) -> None:
    """The base must be present or pullable; say how to make one where no registry answers."""
    from docker.errors import APIError, ImageNotFound

    try:
        client.images.get(base_image)
        return
    except ImageNotFound:
        pass
    try:
        client.images.pull(base_image)
    except APIError as error:
        raise FlywheelError(
            f"base image {base_image} is not in the engine and cannot be pulled ({error.explanation}). "
            "Where no registry is reachable, build one locally: `make docker-base` makes "
            "flywheel-base:bookworm (debootstrap + docker import); then set package.base_image "
            "to it in params.yaml (or pass --base-image)."
        ) from None


def build_image(client, context: Path, tag: str, base_image: str, version: str, bake_model: bool):
    from docker.errors import BuildError

    try:
        image, _ = client.images.build(
            path=str(context),
            tag=tag,
            rm=True,
            forcerm=True,
            pull=False,
            buildargs={"BASE_IMAGE": base_image, "MODEL_VERSION": version},
            labels={MODEL_BAKED_LABEL: str(bake_model).lower()},
        )
    except BuildError as error:
        log = "".join(str(entry.get("stream", entry.get("error", ""))) for entry in error.build_log)
        raise FlywheelError(f"docker build of {tag} failed: {error.msg}\n{log[-3000:]}") from None
    return image


def image_tag(config: PackageParams, version: str) -> str:
    return f"{config.image}:{version}"


def package(params: Params, version: str | None = None, base_image: str | None = None) -> dict:
    """Build the serving image of `version` (default: the newest in staging)."""
    config = params.package
    version = version or registry.latest(registry.PROMOTED)
    base_image = base_image or config.base_image
    engine = engine_server(params)
    client = docker_client()
    require_base_image(client, base_image)
    model = serving_model(params, version)
    house = wheelhouse(config)
    tag = image_tag(config, version)
    with tempfile.TemporaryDirectory(prefix="flywheel-package-") as context:
        build_context(Path(context), house, model, source_file(params), config.bake_model, engine)
        image = build_image(client, Path(context), tag, base_image, version, config.bake_model)
    record = {
        "version": version,
        "tag": tag,
        "image_id": image.id,
        "size_bytes": image.attrs["Size"],
        "base_image": base_image,
        "model_baked_in": config.bake_model,
        "engine": params.serve.engine,
        "model_dir": str(model),
    }
    write_json(RECORDS_DIR / f"{version}.json", record)
    return record


def report(record: dict) -> str:
    where = "baked in" if record["model_baked_in"] else f"mounted from {record['model_dir']} at /srv/model"
    return (
        f"built {record['tag']} ({record['image_id'][:19]}, {record['size_bytes'] / 1e6:,.0f} MB) "
        f"from {record['base_image']}; model {where}\n"
        f"record: {RECORDS_DIR / (record['version'] + '.json')}; deploy it with "
        f"`flywheel deploy {record['version']} --target docker`"
    )
