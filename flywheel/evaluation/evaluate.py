"""evaluate: decide, with numbers, whether the aligned model may replace the one in production.

Input:  models/aligned/               the candidate
        models/sft/                   the supervised model it was aligned from (for comparison)
        evaluate.production_model     the deployed model (written by the deploy stage); absent
                                      before the first deploy, when the candidate is judged on
                                      the absolute thresholds alone
        data/processed/test.parquet   held-out prompts with reference answers
        data/eval/safety_probe.jsonl  prompts that must be refused, or answered (each checked
                                      against the SFT and preference train prompts: a probe
                                      seen in training is reported, it measures memory)
Output: metrics/evaluate.json         every metric for candidate, SFT and production side by side
                                      (`dvc metrics diff` compares runs), and the hallucination
                                      detector's validation (AUROC)
        metrics/gate.json             the promotion decision and its reasons
        reports/evaluate/index.html   the comparison as a page with plots

Per model: perplexity of the test references; exact match, token F1 and ROUGE-L of greedy answers
against them; refusal and empty-answer rates; latency and tokens/s of single requests; the
hallucination rate by reference (flywheel/evaluation/hallucination.py) and by self-consistency; and the
safety probe's pass rate. The gate (evaluate.gate) checks absolute floors and ceilings, and how
much worse than production the candidate may be. `flywheel models register` then records the
decision in the model registry (flywheel/release/registry.py).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from flywheel import modeling, paths, text
from flywheel.config import GATED_METRICS, EvaluateParams, GateParams, Params
from flywheel.errors import FlywheelError
from flywheel.evaluation import hallucination, scoring
from flywheel.io import read_batches, read_records, write_json

SAFETY_EXPECTATIONS = ("refuse", "answer")


@dataclass
class Subject:
    """A model under evaluation: its role (candidate, sft, production), where it is, what it is."""

    role: str
    path: Path
    model: object
    tokenizer: object
    lineage: dict


# ---------------------------------------------------------------------------------------------
# Inputs


def load_subject(role: str, path: Path, fix: str) -> Subject:
    if not (path / "config.json").is_file():
        raise FlywheelError(f"{role} model {path} is not a model (no config.json there): {fix}")
    try:
        model, tokenizer = modeling.load_pretrained(str(path))
    except FlywheelError as error:
        raise FlywheelError(f"{role} model {path}: {error}") from None
    weights = sorted(path.glob("*.safetensors"))
    lineage = {"path": str(path), "md5": modeling.file_md5(weights[0]) if weights else None}
    card = path / "lineage.json"
    if card.is_file():
        lineage["version"] = json.loads(card.read_text()).get("version")
    return Subject(role, path, model, tokenizer, lineage)


def load_safety_probe(path: Path) -> list[dict]:
    """{prompt, expect: refuse | answer, category} per line; a bad line stops the stage."""
    if not path.is_file():
        raise FlywheelError(f"safety probe {path} not found; set evaluate.safety_probe in params.yaml")
    probe = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as error:
            raise FlywheelError(f"{path}:{number}: not JSON ({error})") from None
        if (
            not isinstance(item, dict)
            or not str(item.get("prompt", "")).strip()
            or item.get("expect") not in SAFETY_EXPECTATIONS
        ):
            raise FlywheelError(
                f'{path}:{number}: expected {{"prompt": ..., "expect": "refuse" | "answer"}}, got {line[:120]!r}'
            )
        probe.append(item)
    if not probe:
        raise FlywheelError(f"safety probe {path} is empty")
    return probe


def probes_seen_in_training(root: Path, probe: list[dict]) -> list[str]:
    """Probe prompts that a model was trained on (SFT train split or preference pairs): a probe
    must measure what the model does with requests it has not seen, not what it memorised."""
    trained = set()
    for artifact in (paths.TRAIN, paths.PREFERENCES_TRAIN):
        if (root / artifact).is_file():
            for batch in read_batches(root / artifact):
                trained.update(text.dedup_key(row["prompt"]) for row in batch)
    return [item["prompt"] for item in probe if text.dedup_key(item["prompt"]) in trained]


def load_test(root: Path, config: EvaluateParams) -> list[dict]:
    path = paths.TEST.require(root)
    records = read_records(path)
    if not records:
        raise FlywheelError(f"{path} holds no records: nothing to evaluate on (see metrics/split.json)")
    return records[: config.test_examples]


# ---------------------------------------------------------------------------------------------
# Measuring one model


def perplexity(subject: Subject, conversations: list[list[dict]], references: list[str]) -> float:
    stats = modeling.response_token_logprobs(subject.model, subject.tokenizer, conversations, references)
    total, tokens = sum(s for s, _ in stats), sum(n for _, n in stats)
    return math.exp(-total / tokens)


def latency(subject: Subject, conversations: list[list[dict]], config: EvaluateParams) -> dict:
    """Single requests, one after another, as a served model answers them (after one warm-up)."""
    modeling.timed_answer(subject.model, subject.tokenizer, conversations[0], max_new_tokens=config.max_new_tokens)
    timings = [
        modeling.timed_answer(subject.model, subject.tokenizer, conversation, max_new_tokens=config.max_new_tokens)
        for conversation in conversations[: config.latency_examples]
    ]
    seconds = [s for _, _, s in timings]
    quantiles = statistics.quantiles(seconds, n=20) if len(seconds) > 1 else seconds * 19
    return {
        "latency_p50_ms": 1000 * statistics.median(seconds),
        "latency_p95_ms": 1000 * quantiles[18],
        "tokens_per_second": sum(n for _, n, _ in timings) / sum(seconds),
    }


def consistency(
    subject: Subject,
    conversations: list[list[dict]],
    answers: list[str],
    records: list[dict],
    embedder,
    config: EvaluateParams,
) -> tuple[dict, list[float]]:
    """SelfCheckGPT-style rate on the first `consistency.prompts` prompts (their references
    unused), and how well disagreement predicts a wrong answer there (AUROC against token F1 to
    the reference below 0.5), as a check that the method works on this model."""
    checked = config.consistency
    count = min(checked.prompts, len(conversations))
    if count == 0:
        return {"consistency_hallucination_rate": None}, []
    samples = modeling.sample(
        subject.model,
        subject.tokenizer,
        conversations[:count],
        samples=checked.samples,
        temperature=checked.temperature,
        max_new_tokens=config.max_new_tokens,
        seed=checked.seed,
    )
    scores = hallucination.disagreement(answers[:count], samples, embedder)
    wrong = [scoring.token_f1(a, r["response"]) < 0.5 for a, r in zip(answers, records[:count])]
    auroc = None
    if 0 < sum(wrong) < count:
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(wrong, scores))
    return {
        "consistency_hallucination_rate": scoring.mean([s > checked.threshold for s in scores]),
        "consistency_auroc_vs_wrong_answers": auroc,
    }, scores


def safety(subject: Subject, probe: list[dict], config: EvaluateParams) -> tuple[dict, list[dict]]:
    """The share of probes handled as expected, overall and for harmful (refuse) and benign
    (answer) prompts apart: refusing everything passes the first kind and fails the second."""
    answers = modeling.generate(
        subject.model,
        subject.tokenizer,
        [[{"role": "user", "content": item["prompt"]}] for item in probe],
        max_new_tokens=config.max_new_tokens,
    )
    results = []
    for item, answer in zip(probe, answers):
        refused = scoring.is_refusal(answer)
        passed = refused if item["expect"] == "refuse" else not refused and not scoring.is_empty(answer)
        results.append({**item, "answer": answer, "passed": passed})
    rates = {"safety_pass_rate": scoring.mean([r["passed"] for r in results])}
    for expect in SAFETY_EXPECTATIONS:
        rates[f"safety_pass_rate_{expect}"] = scoring.mean([r["passed"] for r in results if r["expect"] == expect])
    return rates, results


def measure(
    subject: Subject, records: list[dict], probe: list[dict], embedder, config: EvaluateParams
) -> tuple[dict, dict]:
    """(metrics, per-answer details for the report) of one model."""
    conversations = [modeling.record_messages(r, with_response=False) for r in records]
    references = [r["response"] for r in records]
    started = time.perf_counter()
    answers = modeling.generate(subject.model, subject.tokenizer, conversations, max_new_tokens=config.max_new_tokens)
    generation_seconds = time.perf_counter() - started
    judged = hallucination.reference_hallucinations(answers, records, embedder, config.hallucination)
    flags = [j["hallucinated"] for j in judged if j["hallucinated"] is not None]
    consistent, disagreement = consistency(subject, conversations, answers, records, embedder, config)
    safety_rates, safety_results = safety(subject, probe, config)
    metrics = {
        "perplexity": perplexity(subject, conversations, references),
        "exact_match": modeling.exact_match(answers, references),
        "token_f1": scoring.mean([scoring.token_f1(a, r) for a, r in zip(answers, references)]),
        "rouge_l": scoring.mean([scoring.rouge_l(a, r) for a, r in zip(answers, references)]),
        "refusal_rate": scoring.mean([scoring.is_refusal(a) for a in answers]),
        "empty_rate": scoring.mean([scoring.is_empty(a) for a in answers]),
        "hallucination_rate": scoring.mean(flags),
        "hallucination_judged": len(flags),
        **consistent,
        **safety_rates,
        "batch_generation_seconds": generation_seconds,
        **latency(subject, conversations, config),
    }
    details = {"answers": answers, "judged": judged, "disagreement": disagreement, "safety": safety_results}
    return metrics, details


# ---------------------------------------------------------------------------------------------
# The gate


def _worse_by(metric: str, candidate: float, production: float) -> float:
    return production - candidate if GATED_METRICS[metric] == "higher" else candidate - production


def judge(candidate: dict, production: dict | None, gate: GateParams) -> list[dict]:
    """One check per gate rule: {metric, rule, value, limit, passed, reason}."""
    checks = []

    def check(metric, rule, value, limit, passed, why):
        checks.append(
            {
                "metric": metric,
                "rule": rule,
                "value": value,
                "limit": limit,
                "passed": passed,
                "reason": None if passed else why,
            }
        )

    for metric, floor in gate.minimum.items():
        value = candidate.get(metric)
        check(
            metric,
            "minimum",
            value,
            floor,
            value is not None and value >= floor,
            f"{metric} is {_fmt(value)}, below the minimum {floor}",
        )
    for metric, ceiling in gate.maximum.items():
        value = candidate.get(metric)
        check(
            metric,
            "maximum",
            value,
            ceiling,
            value is not None and value <= ceiling,
            f"{metric} is {_fmt(value)}, above the maximum {ceiling}",
        )
    if production is not None:
        for metric, allowed in gate.max_regression.items():
            value, baseline = candidate.get(metric), production.get(metric)
            if baseline is None:
                continue  # production has no value to compare with
            worse = None if value is None else _worse_by(metric, value, baseline)
            check(
                metric,
                "max_regression",
                value,
                allowed,
                worse is not None and worse <= allowed,
                f"{metric} is {_fmt(value)} against production's {_fmt(baseline)}: worse by "
                f"{_fmt(worse)}, more than the {allowed} allowed",
            )
    return checks


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def decide(checks: list[dict], candidate: Subject, production: Subject | None) -> dict:
    passed = all(c["passed"] for c in checks)
    return {
        "passed": passed,
        "decision": "staging" if passed else "rejected",
        "reasons": [c["reason"] for c in checks if not c["passed"]],
        "judged_against": (
            "absolute thresholds only: no production model yet (first run)"
            if production is None
            else f"absolute thresholds and the production model {production.path}"
        ),
        "candidate": candidate.lineage,
        "production": production.lineage if production else None,
        "checks": checks,
    }


# ---------------------------------------------------------------------------------------------
# The stage


def run(params: Params, root: Path = Path(".")) -> dict:
    from flywheel.evaluation.report import write as write_report

    config = params.evaluate
    records = load_test(root, config)
    probe = load_safety_probe(root / config.safety_probe)
    seen = probes_seen_in_training(root, probe)
    for prompt in seen:
        print(f"evaluate: warning: safety probe prompt seen in training data: {prompt!r}", flush=True)
    candidate = load_subject("candidate", root / paths.ALIGNED_MODEL, paths.ALIGNED_MODEL.run_first)
    subjects = [candidate, load_subject("sft", root / paths.SFT_MODEL, paths.SFT_MODEL.run_first)]
    production_dir = root / config.production_model
    production = None
    if production_dir.exists():
        production = load_subject(
            "production",
            production_dir,
            f"{config.production_model} must hold the deployed model; "
            "redeploy, or remove it to judge on absolute thresholds only",
        )
        subjects.append(production)
    embedder = hallucination.load_embedder(config.hallucination.embedding_model)

    examples = hallucination.labelled_set(records, config.hallucination.labelled_examples, config.hallucination.seed)
    detector = hallucination.validate_detector(
        examples, embedder, config.hallucination.overlap_weight, config.hallucination.threshold
    )
    roc = detector.pop("roc", None)
    measured, details = {}, {}
    for subject in subjects:
        print(f"evaluate: measuring the {subject.role} model ({subject.path})", flush=True)
        measured[subject.role], details[subject.role] = measure(subject, records, probe, embedder, config)

    gate = decide(judge(measured["candidate"], measured.get("production"), config.gate), candidate, production)
    metrics = {
        "test_examples": len(records),
        "safety_probe_prompts": len(probe),
        "safety_probe_seen_in_training": len(seen),
        "models": measured,
        "lineage": {s.role: s.lineage for s in subjects},
        "hallucination_detector": detector,
        "gate": {key: gate[key] for key in ("passed", "decision", "judged_against", "reasons")},
    }
    write_json(root / paths.GATE, gate)
    write_report(root / paths.EVALUATION_REPORT, metrics=metrics, gate=gate, records=records, details=details, roc=roc)
    return metrics


def report(metrics: dict) -> str:
    models = metrics["models"]
    roles = list(models)
    rows = [
        "exact_match",
        "token_f1",
        "rouge_l",
        "perplexity",
        "hallucination_rate",
        "consistency_hallucination_rate",
        "safety_pass_rate",
        "refusal_rate",
        "empty_rate",
        "latency_p95_ms",
        "tokens_per_second",
    ]
    lines = [
        f"evaluate: {metrics['test_examples']:,} test prompts, {metrics['safety_probe_prompts']} safety probes",
        "  " + f"{'':32}" + "".join(f"{role:>12}" for role in roles),
    ]
    lines += ["  " + f"{name:32}" + "".join(f"{_fmt(models[role].get(name)):>12}" for role in roles) for name in rows]
    detector = metrics["hallucination_detector"]
    lines.append(
        f"  hallucination detector AUROC {_fmt(detector.get('auroc'))} on {detector['examples']} labelled answers"
    )
    gate = metrics["gate"]
    verdict = "PASSED -> staging" if gate["passed"] else "REJECTED"
    lines.append(f"  gate: {verdict} (judged on {gate['judged_against']})")
    lines += [f"    - {reason}" for reason in gate["reasons"]]
    lines.append(f"  wrote {paths.GATE}, {paths.EVALUATION_REPORT} (open it in a browser)")
    return "\n".join(lines)
