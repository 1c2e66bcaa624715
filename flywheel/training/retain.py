"""retain: what the base model can do outside the task, written down so fine-tuning keeps it.

Input:  models/base                          the imported pretrained model
        finetune.retain.prompts              a JSONL file of general prompts (outside the task)
        data/processed/{eval,test}.parquet   prompts no example may carry (with the safety probe)
Output: data/processed/retain.parquet        the base model's own greedy answers as SFT records
        data/interim/retain/removed.jsonl    every prompt read and not used, with its reason
Counts add up: prompts read = kept + removed.

Fine-tuning a pretrained model on one narrow task overwrites what it knew: SmolLM2 fine-tuned on
the sample's short translations answered "What is the capital of France?" with "france". Mixing
the base model's own answers to general prompts into SFT (self-distillation replay) keeps its
behaviour there, and the preferences stage prefers each of those answers over a refusal, so that
alignment on refusals does not spread to every request that is not the task. Off (no prompts)
for the tiny model, which knows nothing worth keeping.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

from flywheel import modeling, paths, scoring, text
from flywheel.config import Params, RetainParams
from flywheel.data import decontaminate, formats
from flywheel.data.records import RECORD_SCHEMA, content_id
from flywheel.errors import FlywheelError
from flywheel.io import ParquetChunkWriter, atomic_path, read_batches
from flywheel.training import lengths, retained

ORIGIN = "retain"


def _key(prompt: str) -> str:
    return text.prompt_key({"prompt": prompt, "context": None})


def held_out_prompts(params: Params, root: Path) -> set[str]:
    """Prompt keys of the eval and test splits and of the safety probe: never trained on."""
    keys = {
        text.prompt_key(row)
        for split in (paths.EVAL, paths.TEST)
        for batch in read_batches(split.require(root))
        for row in batch
    }
    if (root / params.evaluate.safety_probe).is_file():
        keys |= {_key(prompt) for _, prompt in decontaminate.load_safety_probe(params, root)}
    return keys


def read_prompts(config: RetainParams, root: Path, held_out: set[str]) -> tuple[list[dict], list[dict]]:
    """(the first `examples` usable prompts with their line numbers, the lines removed on the way)."""
    source = root / config.prompts
    if not source.is_file():
        raise FlywheelError(f"finetune.retain.prompts: no such file {config.prompts!r}")
    kept, removed, seen = [], [], set()
    for row in formats.read_rows(source, "jsonl"):
        if len(kept) == config.examples:
            break
        reason, prompt = _check(row, config.field, held_out, seen)
        if reason:
            removed.append({"line": row.line, "reason": reason, "prompt": (prompt or row.snippet)[:500]})
            continue
        seen.add(_key(prompt))
        kept.append({"line": row.line, "prompt": prompt})
    return kept, removed


def _check(row: formats.RawRow, field: str, held_out: set[str], seen: set[str]) -> tuple[str | None, str | None]:
    """(why the line cannot be used or None, its prompt)."""
    if row.problem:
        return row.problem, None
    prompt = row.value.get(field) if isinstance(row.value, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        return f"no_field:{field}", None
    prompt = text.normalize(prompt)
    key = _key(prompt)
    if key in held_out:
        return "held_out_prompt", prompt
    if key in seen:
        return "duplicate", prompt
    return None, prompt


def judge_answer(answer: str, tokens: int, max_new_tokens: int, example_tokens: int, max_length: int) -> str | None:
    """Why an answer is not worth keeping, or None: a cut-off answer would teach the model to
    stop mid-sentence, an empty one or a refusal of a general prompt is nothing to keep, and an
    example longer than finetune's max_length would only be dropped there."""
    if tokens >= max_new_tokens:
        return "unfinished"
    if scoring.is_empty(answer):
        return "empty_answer"
    if scoring.is_refusal(answer):
        return "refused"
    if example_tokens > max_length:
        return "over_max_length"
    return None


def example_lengths(tokenizer, prompts: list[dict], answers: list[str]) -> list[int]:
    """Each prompt and answer's tokens as finetune will see them (its chat template)."""
    conversations = [
        [{"role": "user", "content": prompt["prompt"]}, {"role": "assistant", "content": answer}]
        for prompt, answer in zip(prompts, answers)
    ]
    return [len(ids) for ids, _ in lengths.sft_tokens(tokenizer, conversations)]


def _record(prompt: dict, answer: str, config: RetainParams, base_model: str, ingested_at) -> dict:
    return {
        "id": content_id(prompt["prompt"], answer, None, None, []),
        "prompt": prompt["prompt"],
        "response": answer,
        "context": None,
        "system": None,
        "source": ORIGIN,
        "license": config.license,
        "ingested_at": ingested_at,
        "metadata": json.dumps(
            {"origin": ORIGIN, "file": config.prompts, "line": prompt["line"], "answered_by": base_model}
        ),
    }


def run(params: Params, root: Path = Path(".")) -> dict:
    config = params.finetune.retain
    if not retained.is_on(config):
        _write(root, [], [])
        return {"enabled": False, "prompts_read": 0, "kept": 0, "removed": 0, "removed_by_reason": {}}
    if params.finetune.base_model == "tiny":
        raise FlywheelError(
            "finetune.retain keeps what a pretrained base model can do; the tiny model is built by "
            "finetune and has nothing to keep: set finetune.retain.prompts to null"
        )
    prompts, removed = read_prompts(config, root, held_out_prompts(params, root))
    prompts_read = len(prompts) + len(removed)
    model, tokenizer = modeling.load_pretrained(str(paths.BASE_MODEL.require(root)))
    answers = modeling.generate_counted(
        model,
        tokenizer,
        [[{"role": "user", "content": prompt["prompt"]}] for prompt in prompts],
        max_new_tokens=config.max_new_tokens,
    )
    ingested_at = datetime.fromtimestamp((root / config.prompts).stat().st_mtime, UTC).replace(microsecond=0)
    sizes = example_lengths(tokenizer, prompts, [answer for answer, _ in answers])
    max_length = params.finetune.training.max_length
    records, answer_lengths = [], []
    for prompt, (answer, tokens), size in zip(prompts, answers, sizes):
        reason = judge_answer(answer, tokens, config.max_new_tokens, size, max_length)
        if reason:
            removed.append(
                {"line": prompt["line"], "reason": reason, "prompt": prompt["prompt"][:500], "answer": answer[:500]}
            )
            continue
        records.append(_record(prompt, answer, config, params.finetune.base_model, ingested_at))
        answer_lengths.append(tokens)
    _write(root, records, removed)
    reasons = Counter(entry["reason"] for entry in removed)
    return {
        "enabled": True,
        "prompts": config.prompts,
        "prompts_read": prompts_read,
        "answered": len(prompts),
        "kept": len(records),
        "removed": len(removed),
        "removed_by_reason": dict(sorted(reasons.items())),
        "answer_tokens": {
            "p50": scoring.percentile(answer_lengths, 50) if answer_lengths else None,
            "max": max(answer_lengths, default=None),
        },
    }


def _write(root: Path, records: list[dict], removed: list[dict]) -> None:
    with atomic_path(root / paths.RETAIN) as tmp:
        writer = ParquetChunkWriter(tmp, RECORD_SCHEMA)
        for record in records:
            writer.add(record)
        writer.close()
    with atomic_path(root / paths.RETAIN_REMOVED) as tmp:
        tmp.write_text("".join(json.dumps(entry, ensure_ascii=False) + "\n" for entry in removed))


def report(metrics: dict) -> str:
    if not metrics["enabled"]:
        return "retain: off (finetune.retain.prompts is null or examples 0): SFT trains on the task alone"
    reasons = ", ".join(f"{reason} {count:,}" for reason, count in metrics["removed_by_reason"].items())
    median = metrics["answer_tokens"]["p50"] or 0
    lines = [
        f"retain: {metrics['prompts_read']:,} prompts read from {metrics['prompts']}, {metrics['answered']:,} "
        f"answered by the base model, {metrics['kept']:,} kept (median {median:.0f} tokens), "
        f"{metrics['removed']:,} removed ({reasons or 'none'})"
    ]
    if metrics["kept"] < metrics["answered"] / 2:
        lines.append(
            "  warning: fewer than half the answers were kept: raise finetune.retain.max_new_tokens or "
            f"finetune.training.max_length, or see why in {paths.RETAIN_REMOVED}"
        )
    lines.append(f"  wrote {paths.RETAIN}, {paths.RETAIN_REMOVED}")
    return "\n".join(lines)
