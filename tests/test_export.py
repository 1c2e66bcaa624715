"""flywheel export: the fine-tuned sample model written as an 8-bit GGUF file, read back, and
judged against its float model by the gate's max_regression."""

import json

import pytest

from tests.conftest import BIN, copy_project, run


@pytest.mark.slow
def test_an_8_bit_export_is_a_quarter_of_the_size_answers_as_well_and_passes_the_gate(trained_sft, tmp_path):
    import gguf

    root = copy_project(trained_sft, tmp_path)
    run([str(BIN / "flywheel"), "params", "apply", "evaluate.test_examples=80", "evaluate.latency_examples=4"], root)
    printed = run([str(BIN / "flywheel"), "export", "--model", "models/sft"], root).stdout
    verdict = json.loads((root / "metrics/export.json").read_text())
    assert "gate: passed" in printed and verdict["gate"]["passed"] and verdict["quant"] == "q8_0"
    assert {check["metric"] for check in verdict["gate"]["checks"]} >= {"task_score", "token_f1", "hallucination_rate"}
    assert verdict["size_ratio"] < 0.3, verdict  # float32 weights in 8-bit blocks of 32, each with a scale
    quantised, floating = verdict["models"]["quantised"], verdict["models"]["float"]
    assert quantised["task_score"] >= 0.9 and abs(quantised["perplexity"] - floating["perplexity"]) < 0.05

    export = root / "models/export/sft-q8_0"
    reader = gguf.GGUFReader(export / "model.gguf")  # llama.cpp's own format, read by its own reader
    assert {tensor.tensor_type.name for tensor in reader.tensors} == {"Q8_0", "F32"}  # norms stay float
    description = json.loads((export / "export.json").read_text())
    assert description["source_version"].startswith("md5-") and description["gate"] == "passed"  # served if passed
    assert description["context_tokens"] == 512  # the tiny model's; llama.cpp's engine sizes its slots by it


@pytest.mark.slow
def test_an_unquantised_export_reads_back_to_the_same_logits(trained_sft, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flywheel.release import export

    source = trained_sft / "models/sft"
    export.export(source, "f32", tmp_path / "f32")
    model, tokenizer = export.load(tmp_path / "f32")
    original = AutoModelForCausalLM.from_pretrained(source).eval()
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(source).chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Translate to French: red cat"}], add_generation_prompt=True, tokenize=False
    )
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert torch.equal(model(**encoded).logits, original(**encoded).logits)  # q/k permuted there and back


def test_the_tokenizers_split_gets_the_name_llama_cpp_knows_it_by():
    from flywheel.errors import FlywheelError
    from flywheel.release.export import llama_cpp_pre_tokenizer

    gpt2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    assert llama_cpp_pre_tokenizer(gpt2) == "gpt-2"  # llama.cpp refuses "gpt2" (the tokenizer model's name)
    digits = {"type": "Digits", "individual_digits": True}
    assert llama_cpp_pre_tokenizer({"type": "Sequence", "pretokenizers": [digits, gpt2]}) == "smollm"
    with pytest.raises(FlywheelError, match="no llama.cpp pre-tokenizer"):
        llama_cpp_pre_tokenizer({"type": "Whitespace"})
