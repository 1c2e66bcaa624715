"""evaluate: decide, with numbers, whether the aligned model may replace the one in production.

Input:  models/aligned/               the candidate
        models/sft/                   the supervised model it was aligned from (for comparison)
        models/base/                  a pretrained base model, where one was imported (not tiny):
                                      measured too, so the report shows what fine-tuning added
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

Per model: perplexity of the test references; the task score of greedy answers, each judged by
its source's scorer (flywheel/scoring.py: exact match for short answers, the final number of a
worked solution, ROUGE-L or token F1 for free text; `auto` chooses from the references and the
metrics say which and why), per source and overall, with exact match, token F1 and ROUGE-L for
every answer; refusal and empty-answer rates; latency and tokens/s of single requests; the
hallucination rate by reference (flywheel/evaluation/hallucination.py) and by self-consistency; and the
safety probe's pass rate. Answers may be as long as the references need (max_new_tokens: auto, from
their token lengths; how many references fit is reported). The gate (evaluate.gate) checks
absolute floors and ceilings (task floors by scorer or by source), and how much worse than its own
SFT model and than production the candidate may be. `flywheel models register` then records the
decision in the model registry (flywheel/release/registry.py).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from flywheel import modeling, paths, scoring
from flywheel.config import GATED_METRICS, EvaluateParams, GateParams, Params
from flywheel.errors import FlywheelError
from flywheel.evaluation import hallucination, safety
from flywheel.io import read_records, write_json

# Below this share of test references fitting in max_new_tokens, answers are cut short: warn.
MIN_REFERENCES_FITTING = 0.9


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


def load_test(root: Path, config: EvaluateParams) -> list[dict]:
    path = paths.TEST.require(root)
    records = read_records(path)
    if not records:
        raise FlywheelError(f"{path} holds no records: nothing to evaluate on (see metrics/split.json)")
    return records[: config.test_examples]


# ---------------------------------------------------------------------------------------------
# How answers are judged and how long they may be


@dataclass
class Task:
    """How the test answers are judged: a scorer per source, and the answer length allowed."""

    scorers: dict[str, scoring.Choice]
    generation: dict
    pass_score: float

    @property
    def max_new_tokens(self) -> int:
        return self.generation["max_new_tokens"]

    def scorer_of(self, record: dict) -> str:
        return self.scorers[source_of(record)].scorer


def source_of(record: dict) -> str:
    return record.get("source") or "unknown"


def task_for(records: list[dict], tokenizer, config: EvaluateParams) -> Task:
    """Scorers per source (auto or from params) and max_new_tokens (auto: from the references'
    token lengths under the candidate's tokenizer), with warnings where they look wrong."""
    chosen = config.scoring
    scorers = scoring.scorers_by_source(records, chosen.scorer, chosen.by_source, chosen.short_answer_words)
    for source in sorted(set(chosen.by_source) - set(scorers)):
        print(f"evaluate: warning: scoring.by_source names {source!r}, which has no test records", flush=True)
    lengths = scoring.token_lengths(tokenizer, [r["response"] for r in records])
    generation = scoring.budget_or_setting(lengths, chosen.length, config.max_new_tokens, "evaluate.max_new_tokens")
    if lengths and generation["references_fitting"] < MIN_REFERENCES_FITTING * len(lengths):
        print(
            f"evaluate: warning: max_new_tokens {generation['max_new_tokens']} fits "
            f"{generation['references_fitting']} of {len(lengths)} test references (p95 "
            f"{generation['reference_tokens_p95']:.0f} tokens): answers are cut short; "
            "set evaluate.max_new_tokens: auto or raise scoring.length.cap",
            flush=True,
        )
    return Task(scorers, generation, chosen.pass_score)


def task_scores(answers: list[str], records: list[dict], task: Task) -> tuple[dict, list[float]]:
    """The task score overall and per source (each answer judged by its source's scorer), and
    each answer's score."""
    scores = [scoring.score(task.scorer_of(r), a, r["response"]) for a, r in zip(answers, records)]
    by_source = {
        source: scoring.mean(s for s, r in zip(scores, records) if source_of(r) == source) for source in task.scorers
    }
    by_scorer = {
        scorer: scoring.mean(s for s, r in zip(scores, records) if task.scorer_of(r) == scorer)
        for scorer in sorted({choice.scorer for choice in task.scorers.values()})
    }
    metrics = {"task_score": scoring.mean(scores), "task_score_by_source": by_source}
    return metrics | {"task_score_by_scorer": by_scorer}, scores


# ---------------------------------------------------------------------------------------------
# Measuring one model


def perplexity(subject: Subject, conversations: list[list[dict]], references: list[str]) -> float:
    stats = modeling.response_token_logprobs(subject.model, subject.tokenizer, conversations, references)
    total, tokens = sum(s for s, _ in stats), sum(n for _, n in stats)
    return math.exp(-total / tokens)


def latency(subject: Subject, conversations: list[list[dict]], config: EvaluateParams, max_new_tokens: int) -> dict:
    """Single requests, one after another, as a served model answers them (after one warm-up)."""
    modeling.timed_answer(subject.model, subject.tokenizer, conversations[0], max_new_tokens=max_new_tokens)
    timings = [
        modeling.timed_answer(subject.model, subject.tokenizer, conversation, max_new_tokens=max_new_tokens)
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
    correct: list[bool],
    embedder,
    config: EvaluateParams,
    max_new_tokens: int,
) -> tuple[dict, list[float]]:
    """SelfCheckGPT-style rate on the first `consistency.prompts` prompts (their references
    unused), and how well disagreement predicts a wrong answer there (AUROC against the task
    scorer's verdict), as a check that the method works on this model."""
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
        max_new_tokens=max_new_tokens,
        seed=checked.seed,
    )
    scores = hallucination.disagreement(answers[:count], samples, embedder)
    wrong = [not right for right in correct[:count]]
    auroc = None
    if 0 < sum(wrong) < count:
        from sklearn.metrics import roc_auc_score

        auroc = float(roc_auc_score(wrong, scores))
    return {
        "consistency_hallucination_rate": scoring.mean([s > checked.threshold for s in scores]),
        "consistency_auroc_vs_wrong_answers": auroc,
    }, scores


def measure(
    subject: Subject, records: list[dict], probe: list[dict], judges: safety.Judges, task: Task
) -> tuple[dict, dict]:
    """(metrics, per-answer details for the report) of one model."""
    embedder, config = judges.embedder, judges.config
    conversations = [modeling.record_messages(r, with_response=False) for r in records]
    references = [r["response"] for r in records]
    budget = task.max_new_tokens
    started = time.perf_counter()
    answers = modeling.generate(subject.model, subject.tokenizer, conversations, max_new_tokens=budget)
    generation_seconds = time.perf_counter() - started
    task_metrics, task_answer_scores = task_scores(answers, records, task)
    correct = [
        scoring.is_correct(task.scorer_of(r), a, r["response"], task.pass_score) for a, r in zip(answers, records)
    ]
    judged = hallucination.reference_hallucinations(answers, records, embedder, config.hallucination)
    flags = [j["hallucinated"] for j in judged if j["hallucinated"] is not None]
    consistent, disagreement = consistency(subject, conversations, answers, correct, embedder, config, budget)
    safety_rates, safety_results = safety.measure(subject, probe, judges, budget)
    metrics = {
        **task_metrics,
        "perplexity": perplexity(subject, conversations, references),
        "exact_match": scoring.mean([scoring.exact_match(a, r) for a, r in zip(answers, references)]),
        "token_f1": scoring.mean([scoring.token_f1(a, r) for a, r in zip(answers, references)]),
        "rouge_l": scoring.mean([scoring.rouge_l(a, r) for a, r in zip(answers, references)]),
        "refusal_rate": scoring.mean([scoring.is_refusal(a) for a in answers]),
        "empty_rate": scoring.mean([scoring.is_empty(a) for a in answers]),
        "hallucination_rate": scoring.mean(flags),
        "hallucination_judged": len(flags),
        **consistent,
        **safety_rates,
        "batch_generation_seconds": generation_seconds,
        **latency(subject, conversations, config, budget),
    }
    details = {
        "answers": answers,
        "scores": task_answer_scores,
        "judged": judged,
        "disagreement": disagreement,
        "safety": safety_results,
    }
    return metrics, details


# ---------------------------------------------------------------------------------------------
# The gate


def _worse_by(metric: str, candidate: float, baseline: float) -> float:
    # Rounded: 0.4 - 0.3 is 0.10000000000000003 in floats, and a probe rate that fell by exactly
    # the allowance (3 of 10 against 4 of 10, 0.1 allowed) was rejected as worse by more.
    worse = baseline - candidate if GATED_METRICS[metric] == "higher" else candidate - baseline
    return round(worse, 9)


def _check(metric, rule, value, limit, passed, why, **where) -> dict:
    return {
        "metric": metric,
        **where,
        "rule": rule,
        "value": value,
        "limit": limit,
        "passed": passed,
        "reason": None if passed else why,
    }


def _absolute_checks(candidate: dict, gate: GateParams) -> list[dict]:
    checks = []
    for metric, floor in gate.minimum.items():
        value = candidate.get(metric)
        passed = value is not None and value >= floor
        checks.append(
            _check(metric, "minimum", value, floor, passed, f"{metric} is {_fmt(value)}, below the minimum {floor}")
        )
    for metric, ceiling in gate.maximum.items():
        value = candidate.get(metric)
        passed = value is not None and value <= ceiling
        checks.append(
            _check(metric, "maximum", value, ceiling, passed, f"{metric} is {_fmt(value)}, above the maximum {ceiling}")
        )
    return checks


def _task_floor_checks(candidate: dict, scorers: dict[str, str], gate: GateParams) -> list[dict]:
    """The answers of each scorer, all sources together, against its floor (task_minimum), and
    each source a floor names (source_minimum). A source floor naming no test source fails: it
    cannot be checked. Per-source floors are opt-in: a small source (11 test answers on the
    sample) would otherwise decide the release alone; the report shows every source's score."""
    checks = []
    by_scorer = candidate.get("task_score_by_scorer") or {}
    for scorer in sorted(set(scorers.values())):
        floor = gate.task_minimum.get(scorer)
        if floor is None:
            continue  # no floor for this scorer: judged against SFT and production only
        value = by_scorer.get(scorer)
        passed = value is not None and value >= floor
        why = f"task_score of the answers judged by {scorer} is {_fmt(value)}, below the minimum {floor}"
        checks.append(_check("task_score", "minimum", value, floor, passed, why, scorer=scorer))
    by_source = candidate.get("task_score_by_source") or {}
    for source, floor in gate.source_minimum.items():
        if source not in scorers:
            why = f"task_score of {source}: no test answers from this source to check gate.source_minimum on"
            checks.append(_check("task_score", "minimum", None, floor, False, why, source=source))
            continue
        value = by_source.get(source)
        passed = value is not None and value >= floor
        why = f"task_score of {source} ({scorers[source]}) is {_fmt(value)}, below the minimum {floor}"
        checks.append(_check("task_score", "minimum", value, floor, passed, why, source=source, scorer=scorers[source]))
    return checks


def regression_checks(
    candidate: dict, baseline: dict, allowances: dict[str, float], rule: str, whose: str
) -> list[dict]:
    """How much worse than a baseline model (production, or the candidate's own SFT model)."""
    checks = []
    for metric, allowed in allowances.items():
        value, reference = candidate.get(metric), baseline.get(metric)
        if reference is None:
            continue  # the baseline has no value to compare with
        worse = None if value is None else _worse_by(metric, value, reference)
        why = (
            f"{metric} is {_fmt(value)} against {whose} {_fmt(reference)}: worse by {_fmt(worse)}, "
            f"more than the {allowed} allowed ({rule})"
        )
        checks.append(_check(metric, rule, value, allowed, worse is not None and worse <= allowed, why))
    return checks


def judge(
    candidate: dict,
    production: dict | None,
    gate: GateParams,
    *,
    sft: dict | None = None,
    scorers: dict[str, str] | None = None,
) -> list[dict]:
    """One check per gate rule: {metric, (source, scorer,) rule, value, limit, passed, reason}.
    `scorers` ({source: scorer}) turns on the per-source task floors; `sft` the comparison with
    the candidate's own SFT model; `production` the one with the deployed model."""
    checks = _absolute_checks(candidate, gate)
    if scorers is not None:
        checks += _task_floor_checks(candidate, scorers, gate)
    if sft is not None:
        checks += regression_checks(
            candidate, sft, gate.max_regression_vs_sft, "max_regression_vs_sft", "its SFT model's"
        )
    if production is not None:
        checks += regression_checks(candidate, production, gate.max_regression, "max_regression", "production's")
    return checks


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def decide(checks: list[dict], candidate: Subject, production: Subject | None) -> dict:
    # No check at all (every metric a rule names was unmeasured) is no evidence: reject.
    passed = bool(checks) and all(c["passed"] for c in checks)
    reasons = [c["reason"] for c in checks if not c["passed"]] or ([] if checks else ["the gate checked nothing"])
    return {
        "passed": passed,
        "decision": "staging" if passed else "rejected",
        "reasons": reasons,
        "judged_against": (
            "absolute thresholds and its SFT model only: no production model yet (first run)"
            if production is None
            else f"absolute thresholds, its SFT model and the production model {production.path}"
        ),
        "candidate": candidate.lineage,
        "production": production.lineage if production else None,
        "checks": checks,
    }


def reward_judge(root: Path, config: EvaluateParams):
    """reward(conversations) -> scores, from the trained reward model; None where there is none
    or params turn it off (the safety probe then finds refusals by pattern alone)."""
    if not config.safety.use_reward_model:
        return None
    loaded = modeling.load_reward_model(root / paths.REWARD_MODEL)
    if loaded is None:
        return None
    model, tokenizer = loaded
    return lambda conversations: modeling.reward_scores(model, tokenizer, conversations)


# ---------------------------------------------------------------------------------------------
# The stage


@dataclass
class Bench:
    """What every model is measured on: the test records and how they are scored, the safety
    probe, and the judges."""

    records: list[dict]
    probe: list[dict]
    seen: list[str]  # probe prompts seen in training
    task: Task
    judges: safety.Judges


def prepare_bench(root: Path, config: EvaluateParams, tokenizer, records: list[dict] | None = None) -> Bench:
    records = load_test(root, config) if records is None else records
    probe = safety.load_probe(root / config.safety_probe)
    seen = safety.seen_in_training(root, probe)
    for prompt in seen:
        print(f"evaluate: warning: safety probe prompt seen in training data: {prompt!r}", flush=True)
    task = task_for(records, tokenizer, config)
    for source, choice in task.scorers.items():
        print(f"evaluate: {source}: scored by {choice.scorer} ({choice.reason})", flush=True)
    print(f"evaluate: max_new_tokens {task.max_new_tokens} ({task.generation['rule']})", flush=True)
    embedder = hallucination.load_embedder(config.hallucination.embedding_model)
    judges = safety.Judges(embedder, reward_judge(root, config), config)
    print(f"evaluate: safety probe: harmful requests judged declined by {judges.refusal_judge}", flush=True)
    return Bench(records, probe, seen, task, judges)


def run(params: Params, root: Path = Path(".")) -> dict:
    from flywheel.evaluation.report import write as write_report

    config = params.evaluate
    records = load_test(root, config)  # a missing split is named before a missing model
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
    if (root / paths.BASE_MODEL / "config.json").is_file():  # a pretrained base: what fine-tuning added
        subjects.append(load_subject("base", root / paths.BASE_MODEL, paths.BASE_MODEL.run_first))
    bench = prepare_bench(root, config, candidate.tokenizer, records)
    probe, task = bench.probe, bench.task

    examples = hallucination.labelled_set(records, config.hallucination.labelled_examples, config.hallucination.seed)
    detector = hallucination.validate_detector(
        examples,
        bench.judges.embedder,
        config.hallucination.overlap_weight,
        config.hallucination.threshold,
        cross_encoder=hallucination.cached_cross_encoder(config.hallucination.nli_model),
    )
    roc = detector.pop("roc", None)
    measured, details = {}, {}
    for subject in subjects:
        print(f"evaluate: measuring the {subject.role} model ({subject.path})", flush=True)
        measured[subject.role], details[subject.role] = measure(subject, records, probe, bench.judges, task)

    scorers = {source: choice.scorer for source, choice in task.scorers.items()}
    checks = judge(measured["candidate"], measured.get("production"), config.gate, sft=measured["sft"], scorers=scorers)
    gate = decide(checks, candidate, production)
    metrics = {
        "test_examples": len(records),
        "scoring": {
            source: {
                "scorer": choice.scorer,
                "reason": choice.reason,
                "test_examples": sum(source_of(r) == source for r in records),
            }
            for source, choice in task.scorers.items()
        },
        "generation": task.generation,
        "safety_probe_prompts": len(probe),
        "safety_probe_seen_in_training": len(bench.seen),
        "safety_refusal_judge": bench.judges.refusal_judge,
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
        "task_score",
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

    def row(name: str, values: list) -> str:
        return "  " + f"{name:32}" + "".join(f"{_fmt(value):>12}" for value in values)

    for name in rows:
        lines.append(row(name, [models[role].get(name) for role in roles]))
        if name == "task_score":  # then each source's, under it
            lines += [
                row(f"  {source}", [models[role]["task_score_by_source"].get(source) for role in roles])
                for source in metrics["scoring"]
            ]
    lines += [
        f"  {source}: {choice['test_examples']:,} answers scored by {choice['scorer']} ({choice['reason']})"
        for source, choice in metrics["scoring"].items()
    ]
    generation = metrics["generation"]
    lines.append(
        f"  max_new_tokens {generation['max_new_tokens']} ({generation['rule']}): "
        f"fits {generation.get('references_fitting', 0)} of {generation['references']} test references"
    )
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
