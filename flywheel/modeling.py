"""Models and tokenizers: the chat format, the tiny demo model, loading a base model, greedy
generation and the model card. Shared by fine-tuning, alignment, evaluation and serving, so the
chat template is the same everywhere.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable
from pathlib import Path

from flywheel.config import FinetuneParams, TinyModelParams
from flywheel.errors import FlywheelError

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
# Role markers are followed by a space so that every word, first or not, is tokenised the same
# way. {% generation %} marks the assistant tokens, which are the only ones trained on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %} {{ message['content'] }}<|end|>{% endgeneration %}"
    "{% else %}<|{{ message['role'] }}|> {{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def record_messages(record: dict, *, with_response: bool = True) -> list[dict]:
    """A canonical record as chat messages: system, earlier turns, the prompt (with its context
    after a blank line), and the response."""
    messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": record["system"]})
    metadata = record.get("metadata")
    history = json.loads(metadata).get("history", []) if isinstance(metadata, str) else []
    messages += [{"role": turn["role"], "content": turn["content"]} for turn in history]
    user = record["prompt"] + (f"\n\n{record['context']}" if record.get("context") else "")
    messages.append({"role": "user", "content": user})
    if with_response:
        messages.append({"role": "assistant", "content": record["response"]})
    return messages


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|end|>", chat_template=CHAT_TEMPLATE
    )


def build_tiny_model(tokenizer, config: TinyModelParams, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )


# ChatML (SmolLM2, Qwen, ...) renders every turn with this one expression. Training needs the
# assistant's tokens marked with {% generation %} (the loss is on them alone); ChatML templates
# rarely carry the markers, so the same expression is rewritten to mark the assistant's content
# and its closing <|im_end|> (the model must learn to stop). The rendered text does not change.
_CHATML_TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
_CHATML_TURN_MARKED = (
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}" + _CHATML_TURN + "{% endif %}"
)
_TEMPLATE_CHECKS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
    ],
]


def with_generation_markers(tokenizer) -> bool:
    """Give a ChatML template without {% generation %} markers the marked twin that renders the
    same text (checked on a few conversations, with and without the generation prompt). Returns
    whether the tokenizer's template now marks the assistant's turns."""
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template:
        return True
    if _CHATML_TURN not in template:
        return False
    marked = template.replace(_CHATML_TURN, _CHATML_TURN_MARKED)

    def render(chat_template, messages, prompt):
        return tokenizer.apply_chat_template(
            messages, chat_template=chat_template, tokenize=False, add_generation_prompt=prompt
        )

    same = all(
        render(template, messages, prompt) == render(marked, messages, prompt)
        for messages in _TEMPLATE_CHECKS
        for prompt in (False, True)
    )
    if same:
        tokenizer.chat_template = marked
    return same


def is_adapter(directory: Path) -> bool:
    return (directory / "adapter_config.json").is_file() and not (directory / "config.json").is_file()


def _load_adapter(directory: Path):
    """A PEFT adapter on the base model it names (finetune writes the path relative to the
    adapter's own directory, so the project can move)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    named = json.loads((directory / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = directory / named if not Path(named).is_absolute() else Path(named)
    if not (base / "config.json").is_file():
        raise FlywheelError(f"{directory}: the adapter's base model {base} is not there; run the base stage")
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), directory)


def load_pretrained(name_or_path: str):
    """(model, tokenizer) from a local directory (a model, or a LoRA adapter with the base model
    it names) or, unless HF_HUB_OFFLINE, a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not ((local / "config.json").is_file() or is_adapter(local)):
        raise FlywheelError(
            f"base model {name_or_path!r}: no such model directory (expected a "
            "config.json there); set finetune.base_model in params.yaml"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = (
            _load_adapter(local)
            if looks_local and is_adapter(local)
            else AutoModelForCausalLM.from_pretrained(name_or_path)
        )
    except (OSError, ValueError) as error:
        raise FlywheelError(f"base model {name_or_path!r} could not be loaded: {error}") from None
    if not tokenizer.chat_template:
        raise FlywheelError(
            f"base model {name_or_path!r}: its tokenizer has no chat template, so "
            "prompts cannot be formatted the same way in training and serving; "
            "use an instruction-tuned model or add a chat_template to "
            "tokenizer_config.json"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_base(params: FinetuneParams, training_texts: Iterable[str], imported: Path | None):
    """The model fine-tuning starts from: the tiny model built here, or the one the base stage
    imported into `imported` (models/base) from `params.base_model`."""
    if params.base_model == "tiny":
        tokenizer = train_tokenizer(training_texts, params.tiny.vocab_size)
        return build_tiny_model(tokenizer, params.tiny, params.training.seed), tokenizer
    source = json.loads((imported / "source.json").read_text())
    if source["base_model"] != params.base_model:
        raise FlywheelError(
            f"{imported} holds {source['base_model']!r} but finetune.base_model is {params.base_model!r}: "
            "run the base stage first (dvc repro base)"
        )
    return load_pretrained(str(imported))


def _decode_new(
    model, tokenizer, conversations: list[list[dict]], batch_size: int, **generation
) -> list[tuple[str, int]]:
    """Generate after each conversation's generation prompt: (the new text stripped, the number of
    tokens generated) per answer."""
    import torch

    from flywheel.progress import Progress

    progress = Progress("generating answers to prompts", len(conversations))
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    answers = []
    model.eval()
    try:
        for start in range(0, len(conversations), batch_size):
            prompts = [
                tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                for c in conversations[start : start + batch_size]
            ]
            encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                # synced_gpus off: one process answers on a whole model. Under ZeRO-3 with several
                # ranks, transformers would otherwise wait for the other ranks at every token.
                output = model.generate(
                    **encoded,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                    synced_gpus=False,
                    **generation,
                )
            new_tokens = output[:, encoded["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            counts = (new_tokens != tokenizer.pad_token_id).sum(dim=1).tolist()
            answers += [(text.strip(), count) for text, count in zip(texts, counts)]
            progress.advance(len(prompts))
    finally:
        tokenizer.padding_side = side
    return answers


def generate(
    model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy answers to conversations that end with a user turn."""
    counted = generate_counted(model, tokenizer, conversations, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [text for text, _ in counted]


def generate_counted(
    model, tokenizer, conversations: list[list[dict]], *, max_new_tokens: int, batch_size: int = 32
) -> list[tuple[str, int]]:
    """Greedy answers with the number of tokens each took: `max_new_tokens` means cut off."""
    return _decode_new(model, tokenizer, conversations, batch_size, max_new_tokens=max_new_tokens, do_sample=False)


def timed_answer(model, tokenizer, conversation: list[dict], *, max_new_tokens: int) -> tuple[str, int, float]:
    """One greedy answer generated alone, as a single request is served:
    (text, tokens generated, seconds)."""
    import time

    started = time.perf_counter()
    [(text, count)] = _decode_new(model, tokenizer, [conversation], 1, max_new_tokens=max_new_tokens, do_sample=False)
    return text, count, time.perf_counter() - started


def sample(
    model,
    tokenizer,
    conversations: list[list[dict]],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    batch_size: int = 32,
) -> list[list[str]]:
    """`samples` answers per conversation, drawn at `temperature` (reproducible for a seed)."""
    import torch

    torch.manual_seed(seed)
    flat = _decode_new(
        model,
        tokenizer,
        conversations,
        max(1, batch_size // samples),
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        num_return_sequences=samples,
    )
    return [[text for text, _ in flat[i : i + samples]] for i in range(0, len(flat), samples)]


def file_md5(path: Path) -> str:
    """The md5 DVC records for a file, so a model card's data version matches dvc.lock."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require_model(model_dir: Path) -> None:
    """A model directory that can be loaded and served (a config.json there, or a LoRA adapter's
    adapter_config.json), or a clear error."""
    if not ((model_dir / "config.json").is_file() or is_adapter(model_dir)):
        raise FlywheelError(
            f"{model_dir} is not a model (no config.json there); set serve.model in "
            "params.yaml or run the pipeline first (dvc repro)"
        )


def model_version(model_dir: Path) -> str:
    """The registry version recorded with the model (by deploy), else a hash of its weights."""
    lineage = model_dir / "lineage.json"
    if lineage.is_file():
        version = json.loads(lineage.read_text()).get("version")
        if version:
            return str(version)
    weights = sorted(model_dir.glob("*.safetensors"))
    if weights:
        return f"md5-{file_md5(weights[0])[:12]}"
    return "unversioned"


def code_revision(root: Path = Path(".")) -> str:
    try:
        revision = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{revision}{'+uncommitted changes' if dirty else ''}"


def write_model_card(
    directory: Path,
    *,
    title: str,
    base_model: str,
    lineage: dict,
    params: dict,
    metrics: dict,
    pipeline_tag: str = "text-generation",
    notes: str = "",
) -> None:
    """README.md in the Hugging Face model-card format: YAML front matter, then lineage."""
    import yaml

    front = {
        "library_name": "transformers",
        "pipeline_tag": pipeline_tag,
        "tags": ["flywheel"],
        "base_model": None if base_model == "tiny" else base_model,
    }
    body = [
        f"# {title}",
        "",
        f"Base model: `{base_model}`"
        + (" (a tiny Llama built from config, tokenizer trained on the training data)" if base_model == "tiny" else ""),
        "",
        *([notes, ""] if notes else []),
        "## Lineage",
        "",
        "```yaml",
        yaml.safe_dump(lineage, sort_keys=False).strip(),
        "```",
        "",
        "## Params",
        "",
        "```yaml",
        yaml.safe_dump(params, sort_keys=False).strip(),
        "```",
        "",
        "## Metrics",
        "",
        "```yaml",
        yaml.safe_dump(metrics, sort_keys=False).strip(),
        "```",
        "",
        "Prompts use the tokenizer's chat template (`tokenizer_config.json`), the same in "
        "training, evaluation and serving.",
        "",
    ]
    text = "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body)
    (directory / "README.md").write_text(text)
    (directory / "lineage.json").write_text(
        json.dumps({"lineage": lineage, "params": params, "metrics": metrics}, indent=2, default=str) + "\n"
    )


def load_reward_model(model_dir: Path):
    """(model, tokenizer) of the trained reward model, or None where none was trained."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        return None
    return (AutoModelForSequenceClassification.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))


def reward_scores(model, tokenizer, conversations: list[list[dict]], *, batch_size: int = 32) -> list[float]:
    """The reward of each whole conversation (ending with the answer being judged)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "right"  # the head reads the last non-pad token
    scores = []
    model.eval()
    try:
        for start in range(0, len(conversations), batch_size):
            texts = [
                tokenizer.apply_chat_template(c, tokenize=False) for c in conversations[start : start + batch_size]
            ]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.no_grad():
                scores += model(**encoded).logits[:, 0].float().cpu().tolist()
    finally:
        tokenizer.padding_side = side
    return scores


def response_logprobs(
    model, tokenizer, conversations: list[list[dict]], responses: list[str], *, batch_size: int = 32
) -> list[float]:
    """The summed log-probability the model gives each response after its conversation, under the
    chat template (the same tokens training and serving see)."""
    return [
        total for total, _ in response_token_logprobs(model, tokenizer, conversations, responses, batch_size=batch_size)
    ]


def response_token_logprobs(
    model, tokenizer, conversations: list[list[dict]], responses: list[str], *, batch_size: int = 32
) -> list[tuple[float, int]]:
    """(summed log-probability, number of tokens) of each response after its conversation."""
    import torch

    scores = []
    model.eval()
    for start in range(0, len(conversations), batch_size):
        prompt_ids, full_ids = [], []
        for conversation, response in zip(
            conversations[start : start + batch_size], responses[start : start + batch_size]
        ):
            prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(
                [*conversation, {"role": "assistant", "content": response}], tokenize=False
            )
            prompt_ids.append(tokenizer(prompt, add_special_tokens=False)["input_ids"])
            full_ids.append(tokenizer(full, add_special_tokens=False)["input_ids"])
        width = max(map(len, full_ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in full_ids])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in full_ids])
        with torch.no_grad():
            logits = model(
                input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device)
            ).logits.float()
        token_logprobs = (
            torch.log_softmax(logits[:, :-1], dim=-1)
            .gather(-1, input_ids[:, 1:, None].to(model.device))
            .squeeze(-1)
            .cpu()
        )
        for row, (prompt, full) in enumerate(zip(prompt_ids, full_ids)):
            # Token t is predicted at position t-1: the response's tokens are prompt_len..len-1.
            scores.append((float(token_logprobs[row, len(prompt) - 1 : len(full) - 1].sum()), len(full) - len(prompt)))
    return scores
