"""`flywheel judge`: the hallucination detector on a user's own answers.

Input: JSON lines of {"answer", "reference"?, "context"?, "question"?, "label"?, ...}; each row
needs an answer and a reference or a context (the evidence). Output: one JSON line per input line,
in order, with the row's `id` when it has one: `support`, `hallucinated` and the `reasons` support
was lowered, or `error` naming what is wrong with the row, or `not_judged` (a refusal or an empty
answer). A row with `label` (1: not supported, 0: supported) counts towards an AUROC in the
summary, so a labelled file measures the detector as well as applying it.
"""

from __future__ import annotations

import json
from pathlib import Path

from flywheel import scoring
from flywheel.config import HallucinationParams
from flywheel.errors import FlywheelError
from flywheel.evaluation import hallucination
from flywheel.io import atomic_path

TEXT_FIELDS = ("answer", "reference", "context", "question")


def row_problem(row) -> str | None:
    """Why a parsed row cannot be judged, or None."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    wrong_type = [f for f in TEXT_FIELDS if row.get(f) is not None and not isinstance(row[f], str)]
    if wrong_type:
        return f"{', '.join(wrong_type)} must be text"
    if row.get("answer") is None:
        return "no 'answer' field"
    if not (row.get("reference") or "").strip() and not (row.get("context") or "").strip():
        return "needs a 'reference' or a 'context' to judge the answer against"
    if "label" in row and row["label"] not in (0, 1, True, False):
        return "'label' must be 0 (supported) or 1 (not supported)"
    return None


def parse(lines: list[str]) -> list[dict]:
    """One entry per non-blank line: {"line", "row"} or {"line", "error"}."""
    parsed = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            parsed.append({"line": number, "error": f"not valid JSON ({error.msg} at column {error.colno})"})
            continue
        problem = row_problem(row)
        parsed.append({"line": number, "error": problem} if problem else {"line": number, "row": row})
    return parsed


def judge_rows(parsed: list[dict], embedder, config: HallucinationParams, cross_encoder=None) -> list[dict]:
    """The output line of each parsed entry, in order."""
    rows = [entry["row"] for entry in parsed if "row" in entry]
    judged = iter(
        hallucination.judge_answers(
            [r["answer"] for r in rows],
            [r.get("reference") or "" for r in rows],
            [r.get("context") or "" for r in rows],
            embedder,
            config.overlap_weight,
            cross_encoder,
            [r.get("question") or "" for r in rows],
        )
    )
    results = []
    for entry in parsed:
        result = {"line": entry["line"]}
        row = entry.get("row")
        if row is None:
            results.append({**result, "error": entry["error"]})
            continue
        judgement = next(judged)
        result |= {key: row[key] for key in ("id", "label") if key in row}
        if scoring.is_empty(row["answer"]) or scoring.is_refusal(row["answer"]):
            result["not_judged"] = "empty answer" if scoring.is_empty(row["answer"]) else "refusal"
        else:
            result |= {
                "support": round(judgement.support, 4),
                "hallucinated": judgement.support < config.threshold,
                "reasons": judgement.reasons,
            }
        results.append(result)
    return results


def summarise(results: list[dict], threshold: float) -> dict:
    judged = [r for r in results if "support" in r]
    summary = {
        "rows": len(results),
        "judged": len(judged),
        "hallucinated": sum(r["hallucinated"] for r in judged),
        "not_judged": sum("not_judged" in r for r in results),
        "errors": sum("error" in r for r in results),
        "threshold": threshold,
        "auroc": None,
    }
    labelled = [r for r in judged if "label" in r]
    if len({int(r["label"]) for r in labelled}) == 2:
        from sklearn.metrics import roc_auc_score

        summary["auroc"] = float(roc_auc_score([int(r["label"]) for r in labelled], [-r["support"] for r in labelled]))
        summary["labelled"] = len(labelled)
    return summary


def judge_file(input_path: Path, output_path: Path, embedder, config: HallucinationParams, cross_encoder=None) -> dict:
    if not input_path.is_file():
        raise FlywheelError(f"--input {input_path} does not exist; give a JSON-lines file of answers")
    try:
        lines = input_path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FlywheelError(f"--input {input_path} is not UTF-8 text; give a JSON-lines file of answers") from None
    parsed = parse(lines)
    if not parsed:
        raise FlywheelError(f"--input {input_path} holds no rows")
    results = judge_rows(parsed, embedder, config, cross_encoder)
    with atomic_path(output_path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results), encoding="utf-8")
    return {**summarise(results, config.threshold), "output": str(output_path), "row_errors": _first_errors(results)}


def _first_errors(results: list[dict], shown: int = 10) -> list[str]:
    return [f"line {r['line']}: {r['error']}" for r in results if "error" in r][:shown]


def report(summary: dict) -> str:
    lines = [
        f"judge: {summary['rows']} rows: {summary['judged']} judged, {summary['hallucinated']} flagged as "
        f"hallucinated (support below {summary['threshold']}), {summary['not_judged']} not judged "
        f"(refusals, empty answers), {summary['errors']} with errors",
    ]
    if summary["auroc"] is not None:
        lines.append(f"  AUROC against the rows' labels: {summary['auroc']:.3f} on {summary['labelled']} rows")
    lines += [f"  {error}" for error in summary["row_errors"]]
    if summary["errors"] > len(summary["row_errors"]):
        lines.append(f"  ... and {summary['errors'] - len(summary['row_errors'])} more (see the output)")
    lines.append(f"  wrote {summary['output']}")
    return "\n".join(lines)
