"""preferences: every feedback source there is, turned into clean {prompt, chosen, rejected} pairs.

Input:  data/interim/ingest/preferences.parquet  preference records from ingest (incl. HH transcripts)
        data/raw/feedback/*.jsonl                 feedback exported by `flywheel serve` (see below)
        models/sft + data/processed/train.parquet on-policy pairs: the SFT model's own samples,
                                                  judged against the train references by the
                                                  task scorers evaluate uses (evaluate.scoring)
        data/processed/retain.parquet             the base model's answers to general prompts, each
                                                  preferred over the refusal the other pairs teach
        data/processed/{eval,test}.parquet        prompts no pair may carry (decontamination)
Output: data/processed/preferences/{train,eval}.parquet  the pairs, held-out ones split by prompt
        data/interim/preferences/removed.jsonl    every pair or feedback event not used, with its reason
Counts add up: candidate pairs = train + eval + removed pairs; feedback events = events paired +
unpaired ratings + quarantined events.

A feedback export line is one JSON object: `messages` (the conversation up to the user's turn),
`response` (what the model answered) and one of: `preferred_response` (the user's rewrite: it is
chosen over the response), `alternative` + `preferred` ("response" or "alternative": a choice
between two answers), or `rating` ("up" / "down": an up and a down answer to the same
conversation make a pair).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from flywheel import modeling, paths, scoring, text
from flywheel.config import OnPolicyParams, Params, PreferencesParams, ScoringParams
from flywheel.data.records import (
    PREFERENCE_SCHEMA,
    ROLE_ALIASES,
    Rejected,
    content_id,
    history_of,
    metadata_of,
    origin_of,
    split_conversation,
)
from flywheel.errors import FlywheelError
from flywheel.io import ParquetChunkWriter, atomic_path, read_batches, read_records
from flywheel.pii import redact
from flywheel.training import retained

TEXT_FIELDS = ("prompt", "chosen", "rejected", "context", "system")
REMOVED_TEXT_CHARS = 2_000


def make_pair(
    prompt: str,
    chosen: str,
    rejected: str,
    *,
    origin: str,
    source: str,
    license: str,
    ingested_at,
    system: str | None = None,
    context: str | None = None,
    history: list | None = None,
    **details,
) -> dict:
    history = history or []
    metadata = {"origin": origin, **details, **({"history": history} if history else {})}
    return {
        "id": content_id(prompt, chosen, rejected, context, system, history),
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "context": context,
        "system": system,
        "source": source,
        "license": license,
        "ingested_at": ingested_at,
        "metadata": json.dumps(metadata, ensure_ascii=False, default=str),
    }


# ---------------------------------------------------------------------------------------------
# Sources


def ingested_pairs(root: Path) -> list[dict]:
    pairs = []
    for batch in read_batches(paths.INGESTED_PREFERENCES.require(root)):
        for row in batch:
            metadata = metadata_of(row)
            pairs.append({**row, "metadata": json.dumps({"origin": "ingest", **metadata}, ensure_ascii=False)})
    return pairs


def parse_feedback(value) -> tuple[dict, str]:
    """(conversation fields + the event, kind) for one export line; raises Rejected."""
    if not isinstance(value, dict):
        raise Rejected("not_an_object", f"expected an object, got {type(value).__name__}")
    messages, response = value.get("messages"), value.get("response")
    if not isinstance(messages, list) or not messages:
        raise Rejected("missing_field:messages", "needs the conversation as a list of messages")
    if not isinstance(response, str) or not response.strip():
        raise Rejected("missing_field:response", "needs the model's response as text")
    turns = []
    for position, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLE_ALIASES or not isinstance(message.get("content"), str):
            raise Rejected("bad_messages", f"message {position} needs a known role and text content")
        turns.append((ROLE_ALIASES[role], message["content"]))
    system, history, prompt, response = split_conversation([*turns, ("assistant", response)])
    fields = {
        "prompt": prompt,
        "response": response,
        "system": system,
        "history": history,
        "request_id": value.get("request_id"),
        "created_at": value.get("created_at"),
        "model_version": value.get("model_version"),
    }
    if isinstance(value.get("preferred_response"), str):
        return {**fields, "preferred_response": value["preferred_response"]}, "rewrite"
    if value.get("alternative") is not None or value.get("preferred") is not None:
        if not isinstance(value.get("alternative"), str) or value.get("preferred") not in ("response", "alternative"):
            raise Rejected(
                "bad_choice", "a choice needs `alternative` text and `preferred`: 'response' or 'alternative'"
            )
        return {**fields, "alternative": value["alternative"], "preferred": value["preferred"]}, "choice"
    if value.get("rating") in ("up", "down"):
        return {**fields, "rating": value["rating"]}, "rating"
    if value.get("rating") is not None:
        raise Rejected("bad_rating", f"rating must be 'up' or 'down', got {value['rating']!r}")
    raise Rejected("no_feedback", "needs a rating, a preferred_response, or an alternative + preferred")


def _feedback_pair(event: dict, chosen: str, rejected: str, kind: str, *request_ids) -> dict:
    return make_pair(
        event["prompt"],
        chosen,
        rejected,
        origin="feedback",
        source="feedback",
        license="user-feedback",
        ingested_at=None,
        system=event["system"],
        history=event["history"],
        feedback=kind,
        request_ids=list(request_ids),
        model_version=event["model_version"],
    )


def _rating_pairs(ratings: list[dict]) -> tuple[list[dict], list[dict]]:
    """Pairs from an up and a down answer to the same conversation; (pairs, unpaired events)."""
    by_conversation = defaultdict(lambda: {"up": [], "down": []})
    for event in ratings:
        key = json.dumps([event["system"], event["history"], text.dedup_key(event["prompt"])])
        by_conversation[key][event["rating"]].append(event)
    pairs, unpaired = [], []
    for group in by_conversation.values():
        for up, down in zip(group["up"], group["down"]):
            pairs.append(
                _feedback_pair(up, up["response"], down["response"], "rating", up["request_id"], down["request_id"])
            )
        matched = min(len(group["up"]), len(group["down"]))
        unpaired += group["up"][matched:] + group["down"][matched:]
    return pairs, unpaired


def feedback_pairs(pattern: str, root: Path) -> tuple[list[dict], list[dict], dict]:
    """(pairs, removed entries, counts) from every feedback export matching `pattern`."""
    pairs, removed, ratings = [], [], []
    counts = Counter()
    for path in sorted(p for p in root.glob(pattern) if p.is_file()):
        counts["files"] += 1
        with open(path, encoding="utf-8", errors="replace") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                counts["events"] += 1
                where = {"file": str(path.relative_to(root)), "line": number}
                try:
                    event, kind = parse_feedback(_json_line(line))
                except Rejected as rejected:
                    counts["quarantined"] += 1
                    removed.append(
                        {
                            "origin": "feedback",
                            **where,
                            "reason": rejected.reason,
                            "detail": rejected.detail,
                            "raw": line.strip()[:REMOVED_TEXT_CHARS],
                        }
                    )
                    continue
                if kind == "rewrite":
                    pairs.append(
                        _feedback_pair(event, event["preferred_response"], event["response"], kind, event["request_id"])
                    )
                    counts["paired"] += 1
                elif kind == "choice":
                    other = event["alternative"]
                    chosen, rejected = (
                        (event["response"], other) if event["preferred"] == "response" else (other, event["response"])
                    )
                    pairs.append(_feedback_pair(event, chosen, rejected, kind, event["request_id"]))
                    counts["paired"] += 1
                else:
                    ratings.append({**event, **where})
    rating_pairs, unpaired = _rating_pairs(ratings)
    pairs += rating_pairs
    counts["paired"] += 2 * len(rating_pairs)
    counts["unpaired_ratings"] = len(unpaired)
    removed += [
        {
            "origin": "feedback",
            "file": event["file"],
            "line": event["line"],
            "reason": "unpaired_rating",
            "detail": f"a thumbs-{event['rating']} with no opposite rating for the same conversation",
            "prompt": event["prompt"],
            "response": event["response"],
        }
        for event in unpaired
    ]
    return (
        pairs,
        removed,
        {key: counts[key] for key in ("files", "events", "paired", "unpaired_ratings", "quarantined")},
    )


def _json_line(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise Rejected("bad_json", str(error)) from None


def _judge_samples(answers: list[str], reference: str, scorer: str, pass_score: float) -> tuple[list, list, int]:
    """(correct answers best first, wrong answers, empty answers) of one prompt's samples, each
    judged by the task's scorer: a long worked solution with the right final number is correct."""
    scored = [(answer, scoring.score(scorer, answer, reference)) for answer in answers if answer.strip()]
    needed = scoring.pass_mark(scorer, pass_score)
    correct = sorted((pair for pair in scored if pair[1] >= needed), key=lambda pair: -pair[1])
    wrong = [answer for answer, value in scored if value < needed]
    return [answer for answer, _ in correct], wrong, len(answers) - len(scored)


def _sampling_budget(config: OnPolicyParams, judging: ScoringParams, tokenizer, rows: list[dict]) -> dict:
    """max_new_tokens for the samples: as set, or (auto) from the sampled references' lengths."""
    lengths = scoring.token_lengths(tokenizer, [row["response"] for row in rows])
    return scoring.budget_or_setting(
        lengths, judging.length, config.max_new_tokens, "preferences.on_policy.max_new_tokens"
    )


def on_policy_pairs(config: OnPolicyParams, judging: ScoringParams, root: Path) -> tuple[list[dict], dict]:
    """The SFT model's samples for train prompts with a reference: a correct one (by the task's
    scorer, as evaluate judges) chosen over the most frequent wrong one. Prompts it always (or
    never) gets right give no pair."""
    if config.prompts == 0:
        return [], {"prompts": 0}
    model_dir = root / paths.SFT_MODEL
    if not (model_dir / "config.json").is_file():
        raise FlywheelError(
            f"{model_dir} is not a model: {paths.SFT_MODEL.run_first}, or set preferences.on_policy.prompts: 0"
        )
    train = read_records(paths.TRAIN.require(root))
    scorers = scoring.scorers_by_source(train, judging.scorer, judging.by_source, judging.short_answer_words)
    rows = random.Random(config.seed).sample(train, min(config.prompts, len(train)))
    model, tokenizer = modeling.load_pretrained(str(model_dir))
    budget = _sampling_budget(config, judging, tokenizer, rows)
    samples = modeling.sample(
        model,
        tokenizer,
        [modeling.record_messages(row, with_response=False) for row in rows],
        samples=config.samples,
        temperature=config.temperature,
        max_new_tokens=budget["max_new_tokens"],
        seed=config.seed,
    )
    pairs, counts = [], Counter()
    for row, answers in zip(rows, samples):
        scorer = scorers[row.get("source") or "unknown"].scorer
        correct, wrong, empty = _judge_samples(answers, row["response"], scorer, judging.pass_score)
        counts.update(samples_correct=len(correct), samples_wrong=len(wrong), samples_empty=empty)
        if not wrong:
            counts["all_correct" if correct else "all_empty"] += 1
        elif not correct:
            counts["none_correct"] += 1
        else:
            pairs.append(
                make_pair(
                    row["prompt"],
                    correct[0],
                    Counter(wrong).most_common(1)[0][0],
                    origin="on_policy",
                    source="on_policy",
                    license=row["license"],
                    ingested_at=row["ingested_at"],
                    system=row["system"],
                    context=row["context"],
                    history=history_of(row),
                    record_id=row["id"],
                    judged_by=scorer,
                    sampled=answers,
                )
            )
    return pairs, {
        "prompts": len(rows),
        "samples_per_prompt": config.samples,
        "pairs": len(pairs),
        "all_correct": counts["all_correct"],
        "none_correct": counts["none_correct"],
        "all_empty": counts["all_empty"],
        "samples_correct": counts["samples_correct"],
        "samples_wrong": counts["samples_wrong"],
        "samples_empty": counts["samples_empty"],
        "sampled_accuracy": round(counts["samples_correct"] / max(len(rows) * config.samples, 1), 4),
        "scorers": {source: {"scorer": c.scorer, "reason": c.reason} for source, c in scorers.items()},
        "generation": budget,
    }


# ---------------------------------------------------------------------------------------------
# Cleaning, dedup, decontamination, split


def clean_pair(pair: dict, config: PreferencesParams, pii_counts: Counter) -> dict:
    """The pair with normalised, redacted text and its id recomputed; raises Rejected."""
    cleaned = dict(pair)
    for name in TEXT_FIELDS:
        value = text.normalize(pair[name], markup=True)
        if value and config.redact_pii:
            value, counts = redact(value)
            pii_counts.update(counts)
        cleaned[name] = value or None
    for name in ("prompt", "chosen", "rejected"):
        if not cleaned[name]:
            raise Rejected(f"empty_field:{name}", f"the {name} is empty after normalisation")
    if text.dedup_key(cleaned["chosen"]) == text.dedup_key(cleaned["rejected"]):
        raise Rejected("chosen_equals_rejected", "nothing to prefer: both responses are the same")
    total = (
        len(cleaned["prompt"]) + len(cleaned["context"] or "") + max(len(cleaned["chosen"]), len(cleaned["rejected"]))
    )
    if total > config.max_chars:
        raise Rejected("too_long", f"{total:,} chars > {config.max_chars:,}")
    cleaned["id"] = content_id(
        cleaned["prompt"],
        cleaned["chosen"],
        cleaned["rejected"],
        cleaned["context"],
        cleaned["system"],
        history_of(pair),
    )
    return cleaned


def held_out_prompts(root: Path) -> dict[str, str]:
    """prompt key -> name of the SFT split (eval/test) that holds it."""
    keys = {}
    for name in ("eval", "test"):
        path = paths.SPLITS[name].require(root)
        keys.update({text.prompt_key(row): name for batch in read_batches(path) for row in batch})
    return keys


def assign(prompt: str, config: PreferencesParams) -> str:
    """train or eval by a hash of the prompt key, so one prompt's pairs never straddle the split."""
    digest = hashlib.sha256(f"{config.salt}\x1f{prompt}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < config.eval_fraction else "train"


def _removed_pair(pair: dict, reason: str, detail: str) -> dict:
    clip = {name: (pair[name] or "")[:REMOVED_TEXT_CHARS] for name in ("prompt", "chosen", "rejected")}
    return {
        "origin": origin_of(pair),
        "source": pair["source"],
        "id": pair["id"],
        "reason": reason,
        "detail": detail,
        **clip,
    }


def answer_over_refusal_pairs(candidates: list[dict], retained_rows: list[dict]) -> tuple[list[dict], dict]:
    """Each retained answer (the base model's own, to a general prompt) preferred over the refusal
    the other pairs prefer most often. Pairs that only ever prefer refusing teach a small model to
    refuse whatever is not the task (SmolLM2 refused "Give me one tip for a job interview."):
    these teach it when not to."""
    refusals = Counter(pair["chosen"] for pair in candidates if scoring.is_refusal(pair["chosen"]))
    counts = {"retained_answers": len(retained_rows), "refusal": None, "pairs": 0}
    if not retained_rows or not refusals:
        return [], counts
    refusal = refusals.most_common(1)[0][0]
    pairs = [
        make_pair(
            row["prompt"],
            row["response"],
            refusal,
            origin="retain",
            source=row["source"],
            license=row["license"],
            ingested_at=row["ingested_at"],
            record_id=row["id"],
        )
        for row in retained_rows
    ]
    return pairs, {**counts, "refusal": refusal, "pairs": len(pairs)}


def run(params: Params, root: Path = Path(".")) -> dict:
    config = params.preferences
    candidates = ingested_pairs(root)
    from_feedback, removed, feedback_counts = feedback_pairs(config.feedback, root)
    from_policy, policy_counts = on_policy_pairs(config.on_policy, params.evaluate.scoring, root)
    candidates += from_feedback + from_policy
    from_retain, retain_counts = answer_over_refusal_pairs(candidates, retained.records(params.finetune.retain, root))
    candidates += from_retain
    contaminating = held_out_prompts(root) if config.decontaminate else {}

    seen: dict[tuple, str] = {}
    kept = {"train": [], "eval": []}
    reasons, pii_counts = Counter(), Counter()
    for pair in candidates:
        try:
            cleaned = clean_pair(pair, config, pii_counts)
            prompt = text.prompt_key(cleaned)
            split = contaminating.get(prompt)
            if split:
                raise Rejected(f"{split}_prompt", f"the prompt is in the SFT {split} split")
            key = (prompt, text.dedup_key(cleaned["chosen"]), text.dedup_key(cleaned["rejected"]))
            if key in seen:
                raise Rejected("duplicate", f"same pair as {seen[key]}")
            seen[key] = cleaned["id"]
        except Rejected as rejected:
            reasons[rejected.reason] += 1
            removed.append(_removed_pair(pair, rejected.reason, rejected.detail))
            continue
        kept[assign(prompt, config)].append(cleaned)

    _write(root, kept, removed)
    by_source = defaultdict(lambda: {"train": 0, "eval": 0})
    for name, pairs in kept.items():
        for pair in pairs:
            by_source[pair["source"]][name] += 1
    return {
        "candidates": {
            origin: sum(origin_of(p) == origin for p in candidates)
            for origin in ("ingest", "feedback", "on_policy", "retain")
        },
        "train": len(kept["train"]),
        "eval": len(kept["eval"]),
        "removed": sum(reasons.values()),
        "removed_by_reason": dict(sorted(reasons.items())),
        "by_source": dict(sorted(by_source.items())),
        "feedback": feedback_counts,
        "on_policy": policy_counts,
        "answer_over_refusal": retain_counts,
        "pii_redacted": dict(sorted(pii_counts.items())),
    }


def _write(root: Path, kept: dict[str, list[dict]], removed: list[dict]) -> None:
    with contextlib.ExitStack() as stack:
        for name, pairs in kept.items():
            writer = ParquetChunkWriter(
                stack.enter_context(atomic_path(root / paths.PREFERENCE_SPLITS[name])), PREFERENCE_SCHEMA
            )
            for pair in pairs:
                writer.add(pair)
            writer.close()
        with atomic_path(root / paths.PREFERENCES_REMOVED) as tmp:
            tmp.write_text("".join(json.dumps(entry, ensure_ascii=False, default=str) + "\n" for entry in removed))


def report(metrics: dict) -> str:
    candidates = metrics["candidates"]
    lines = [
        f"preferences: {sum(candidates.values()):,} candidate pairs ("
        + ", ".join(f"{origin} {count:,}" for origin, count in candidates.items())
        + f") -> train {metrics['train']:,}, eval {metrics['eval']:,}, removed {metrics['removed']:,}"
    ]
    lines += [f"  {reason}: {count:,}" for reason, count in metrics["removed_by_reason"].items()]
    feedback = metrics["feedback"]
    lines.append(
        f"  feedback: {feedback['events']:,} events in {feedback['files']} file(s): "
        f"{feedback['paired']:,} paired, {feedback['unpaired_ratings']:,} unpaired ratings, "
        f"{feedback['quarantined']:,} quarantined"
    )
    policy = metrics["on_policy"]
    if policy["prompts"]:
        lines.append(
            f"  on-policy: {policy['prompts']:,} prompts x {policy['samples_per_prompt']} samples, "
            f"sampled accuracy {policy['sampled_accuracy']:.3f}, {policy['pairs']:,} pairs "
            f"({policy['all_correct']:,} prompts always right, {policy['none_correct']:,} never, "
            f"{policy['all_empty']:,} only empty answers)"
        )
        judged = ", ".join(f"{source}: {choice['scorer']}" for source, choice in policy["scorers"].items())
        generation = policy["generation"]
        lines.append(
            f"  on-policy samples judged by {judged}; max_new_tokens {generation['max_new_tokens']} "
            f"({generation['rule']}), fits {generation.get('references_fitting', 0)} of "
            f"{generation['references']} references"
        )
    contrast = metrics["answer_over_refusal"]
    if contrast["pairs"]:
        lines.append(
            f"  retained answers: {contrast['pairs']:,} pairs, each the base model's answer to a general prompt "
            f"preferred over {contrast['refusal']!r}"
        )
    if not metrics["train"]:
        lines.append(
            "  no preference pairs to train on: the rlhf stage will skip alignment or fail, "
            "as rlhf.on_missing_preferences says"
        )
    lines.append(f"  wrote {', '.join(map(str, paths.PREFERENCE_SPLITS.values()))}, {paths.PREFERENCES_REMOVED}")
    return "\n".join(lines)
