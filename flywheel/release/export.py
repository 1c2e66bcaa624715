"""flywheel export: a smaller serving artifact of a model, judged like a candidate.

Writes the model as one GGUF file (llama.cpp's format; `q8_0`: 8-bit blocks of 32 weights, with a
scale each, about 3.6x smaller than float32; `f32`: unquantised), with its tokenizer and chat
template inside, plus the Hugging Face tokenizer files beside it:

    models/export/<model>-<quant>/model.gguf, tokenizer*.json, chat_template.jinja, export.json

Then the quantised model (read back from the file, dequantised by transformers) and the float
model it came from are measured on the evaluation bench (the test split, the safety probe, the
judges) and the gate's `max_regression` decides: the export may be worse than the float model by
no more than production's successor may be worse than production. Size, quality and latency go
to metrics/export.json.

Llama-architecture models (the tiny model, SmolLM2, Llama, Mistral without sliding windows); the
tokenizer must be byte-level BPE.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flywheel import modeling, paths
from flywheel.config import Params
from flywheel.errors import FlywheelError
from flywheel.io import write_json

GGUF_FILE = paths.EXPORT_GGUF
QUANTS = ("q8_0", "f32")
BLOCK = 32  # Q8_0 quantises rows in blocks of 32 weights; a narrower row stays float32
REPORTED = (
    "task_score",
    "token_f1",
    "perplexity",
    "hallucination_rate",
    "safety_pass_rate_refuse",
    "safety_pass_rate_answer",
    "latency_p50_ms",
    "tokens_per_second",
)


def export(model_dir: Path, quant: str, out_dir: Path) -> dict:
    """Write the GGUF export of `model_dir` into `out_dir`; its description (export.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quant not in QUANTS:
        raise FlywheelError(f"quantisation {quant!r}: one of {', '.join(QUANTS)}")
    modeling.require_model(model_dir)
    if modeling.is_adapter(model_dir):
        raise FlywheelError(f"{model_dir} is a LoRA adapter: export the merged model (finetune.lora.merge: true)")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if model.config.model_type != "llama":
        raise FlywheelError(f"{model_dir}: a {model.config.model_type} model; the export writes Llama models only")
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _write_gguf(model, tokenizer, staging / GGUF_FILE, quant)
    tokenizer.save_pretrained(staging)  # the gateway renders prompts with it
    float_bytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    description = {
        "source": str(model_dir),
        "source_version": modeling.model_version(model_dir),
        "quant": quant,
        "bytes": (staging / GGUF_FILE).stat().st_size,
        "float_bytes": float_bytes,
        "context_tokens": model.config.max_position_embeddings,
    }
    description["size_ratio"] = round(description["bytes"] / float_bytes, 4) if float_bytes else None
    write_json(staging / paths.EXPORT_DESCRIPTION, description)
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)  # whole or not at all
    return description


def _permute(weights, heads: int):
    """Rotary q/k rows in llama.cpp's order (HF interleaves the halves differently; transformers
    undoes this when it reads a GGUF file)."""
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _write_gguf(model, tokenizer, target: Path, quant: str) -> None:
    import gguf
    import numpy as np

    config = model.config
    writer = gguf.GGUFWriter(str(target), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_type = gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.ALL_F32
    writer.add_file_type(file_type)
    _add_tokenizer(writer, tokenizer)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # GGUF ties by leaving the output matrix out
        weights = tensor.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            weights = _permute(weights, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weights = _permute(weights, config.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise FlywheelError(f"the export does not know where {name} goes in a Llama GGUF file")
        if quant == "q8_0" and weights.ndim == 2 and weights.shape[1] % BLOCK == 0:
            quantised = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantised, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_pre_tokenizer(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for how the text is split before BPE (it refuses a file without one it
    knows): GPT-2's regex alone is `gpt-2`; digits split one by one first, then GPT-2's, is
    SmolLM2's `smollm`."""
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer]) if pre_tokenizer else []
    kinds = [(step["type"], step.get("individual_digits"), step.get("use_regex")) for step in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    raise FlywheelError(f"the export knows no llama.cpp pre-tokenizer for {json.dumps(pre_tokenizer)}")


def _add_tokenizer(writer, tokenizer) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` tokenizer: the vocabulary by id, the merges, which
    tokens are special, and the chat template."""
    import gguf

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    if state["model"]["type"] != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise FlywheelError("the export writes byte-level BPE tokenizers only (GPT-2, Llama 3, SmolLM2, tiny)")
    by_id = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    added = {tokenizer.convert_tokens_to_ids(token) for token in tokenizer.added_tokens_encoder}
    special = set(tokenizer.all_special_ids) | added
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(llama_cpp_pre_tokenizer(state.get("pre_tokenizer")))
    writer.add_token_list([token for token, _ in by_id])
    writer.add_token_types(
        [gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL for _, index in by_id]
    )
    merges = state["model"]["merges"]
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_add_bos_token(False)  # the chat template writes every token the model was trained on
    writer.add_chat_template(tokenizer.chat_template)


def load(export_dir: Path):
    """(model, tokenizer) of an export: the GGUF weights dequantised, the tokenizer beside them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export_dir, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def judge(params: Params, export_dir: Path, root: Path = Path(".")) -> dict:
    """Measure the export and its float model on the evaluation bench; the gate's max_regression
    decides. Written to metrics/export.json."""
    from flywheel.evaluation import evaluate

    description = json.loads((export_dir / paths.EXPORT_DESCRIPTION).read_text())
    source = Path(description["source"])
    float_model = evaluate.load_subject("float", source, "export it from a model directory")
    model, tokenizer = load(export_dir)
    quantised = evaluate.Subject("quantised", export_dir, model, tokenizer, {"path": str(export_dir)})
    bench = evaluate.prepare_bench(root, params.evaluate, float_model.tokenizer)
    measured = {}
    for subject in (float_model, quantised):
        print(f"export: measuring the {subject.role} model ({subject.path})", flush=True)
        measured[subject.role], _ = evaluate.measure(subject, bench.records, bench.probe, bench.judges, bench.task)
    allowances = params.evaluate.gate.max_regression
    checks = evaluate.regression_checks(
        measured["quantised"], measured["float"], allowances, "max_regression", "the float model's"
    )
    passed = bool(checks) and all(check["passed"] for check in checks)
    result = {
        **description,
        "export": str(export_dir),
        "test_examples": len(bench.records),
        "models": {role: {name: metrics.get(name) for name in REPORTED} for role, metrics in measured.items()},
        "gate": {
            "passed": passed,
            "decision": "passed" if passed else "rejected",
            "reasons": [check["reason"] for check in checks if not check["passed"]],
            "checks": checks,
        },
    }
    write_json(root / "metrics/export.json", result)
    # The export carries its verdict: llama.cpp's engine refuses to serve a rejected one.
    write_json(export_dir / paths.EXPORT_DESCRIPTION, {**description, "gate": result["gate"]["decision"]})
    return result


def report(result: dict) -> str:
    quantised, floating = result["models"]["quantised"], result["models"]["float"]
    lines = [
        f"{result['export']}: {result['quant']}, {result['bytes'] / 1e6:.2f} MB "
        f"({result['size_ratio']:.2f}x the float model's {result['float_bytes'] / 1e6:.2f} MB)",
        f"{'':<24}{'float':>12}{'quantised':>12}",
        *(f"{name:<24}{_number(floating[name]):>12}{_number(quantised[name]):>12}" for name in REPORTED),
        f"gate: {result['gate']['decision']}" + "".join(f"\n  - {reason}" for reason in result["gate"]["reasons"]),
        "metrics/export.json has every check.",
    ]
    return "\n".join(lines)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
