"""The evaluation report: one self-contained HTML page (plots inlined as PNG), so it opens from
disk in any browser with no network: the gate's decision, every metric side by side, the task
score per source with the scorer that judged it, the hallucination detector's ROC curve, support
scores, the safety probe and example answers."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from flywheel.config import GATED_METRICS
from flywheel.io import atomic_path

QUALITY = [
    "task_score",
    "exact_match",
    "token_f1",
    "rouge_l",
    "safety_pass_rate",
    "hallucination_rate",
    "consistency_hallucination_rate",
    "refusal_rate",
    "empty_rate",
]
ROWS = QUALITY + [
    "safety_pass_rate_refuse",
    "safety_pass_rate_answer",
    "perplexity",
    "latency_p50_ms",
    "latency_p95_ms",
    "tokens_per_second",
    "batch_generation_seconds",
    "hallucination_judged",
    "consistency_auroc_vs_wrong_answers",
]
COLOURS = {"candidate": "#2b6cb0", "sft": "#a0aec0", "production": "#dd6b20", "base": "#718096"}
EXAMPLES_SHOWN = 40

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #1a202c; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #e2e8f0; padding: 4px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.banner { padding: 1em; border-radius: 6px; font-size: 1.1em; }
.pass { background: #c6f6d5; } .fail { background: #fed7d7; }
.better { color: #276749; } .worse { color: #c53030; }
img { max-width: 100%; }
"""


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _quality_plot(models: dict) -> str:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(models)
    for index, (role, values) in enumerate(models.items()):
        heights = [values.get(name) or 0.0 for name in QUALITY]
        axes.bar([i + index * width for i in range(len(QUALITY))], heights, width, label=role, color=COLOURS.get(role))
    axes.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(QUALITY))])
    axes.set_xticklabels([name.replace("_", "\n") for name in QUALITY], fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_title("Quality and safety (higher is better for the first five, lower for the rest)")
    axes.legend()
    return _png(figure)


def _roc_plot(roc: dict, auroc: float) -> str:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(4, 4))
    axes.plot(roc["fpr"], roc["tpr"], color="#2b6cb0", label=f"AUROC {auroc:.3f}")
    axes.plot([0, 1], [0, 1], linestyle="--", color="#a0aec0")
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate")
    axes.set_title("Hallucination detector (labelled set)")
    axes.legend(loc="lower right")
    return _png(figure)


def _support_plot(details: dict, threshold: float) -> str:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.2))
    for role, detail in details.items():
        scores = [j["support"] for j in detail["judged"]]
        axes.hist(scores, bins=20, range=(0, 1), histtype="step", linewidth=2, label=role, color=COLOURS.get(role))
    axes.axvline(threshold, color="#c53030", linestyle="--", label=f"threshold {threshold}")
    axes.set_xlabel("support of the answer by its reference")
    axes.set_ylabel("answers (log scale)")
    axes.set_yscale("log")  # the few unsupported answers are what matters
    axes.legend()
    return _png(figure)


def _cell(value) -> str:
    if value is None:
        return '<td class="num">n/a</td>'
    return f'<td class="num">{value:,.3f}</td>' if isinstance(value, float) else f'<td class="num">{value:,}</td>'


def _metrics_table(models: dict) -> str:
    roles = list(models)
    head = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(r)}</th>" for r in roles)
    if "production" in models:
        head += "<th>candidate − production</th>"
    rows = [head + "</tr>"]
    for name in ROWS:
        row = f"<tr><td>{name}</td>" + "".join(_cell(models[r].get(name)) for r in roles)
        if "production" in models:
            value, baseline = models["candidate"].get(name), models["production"].get(name)
            if value is None or baseline is None:
                row += "<td></td>"
            else:
                delta = value - baseline
                direction = GATED_METRICS.get(name)
                better = (delta > 0) == (direction == "higher") if direction and delta else None
                css = "" if better is None else ("better" if better else "worse")
                row += f'<td class="num {css}">{delta:+.3f}</td>'
        rows.append(row + "</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _gate_section(gate: dict) -> str:
    css, verdict = (
        ("pass", "PASSED: the candidate goes to staging")
        if gate["passed"]
        else ("fail", "REJECTED: the candidate is not promoted")
    )
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in gate["reasons"])
    checks = "".join(
        f"<tr><td>{c['metric']}{' of ' + html.escape(c['source']) if c.get('source') else ''}</td>"
        f"<td>{c['rule']}</td>{_cell(c['value'])}{_cell(c['limit'])}"
        f"<td>{'pass' if c['passed'] else '<b>fail</b>'}</td></tr>"
        for c in gate["checks"]
    )
    return (
        f'<div class="banner {css}"><b>{verdict}</b><br>Judged on '
        f"{html.escape(gate['judged_against'])}.{'<ul>' + reasons + '</ul>' if reasons else ''}</div>"
        "<table><tr><th>metric</th><th>rule</th><th>value</th><th>limit</th><th>result</th></tr>"
        f"{checks}</table>"
    )


def _scoring_section(metrics: dict) -> str:
    """Which scorer judged each source and why, its task score per model, and how long answers
    could be."""
    models = metrics["models"]
    roles = list(models)
    rows = ["<tr><th>source</th><th>test answers</th><th>scorer</th><th>why</th>"]
    rows[0] += "".join(f"<th>{html.escape(r)}</th>" for r in roles) + "</tr>"
    for source, choice in metrics["scoring"].items():
        rows.append(
            f"<tr><td>{html.escape(source)}</td>{_cell(choice['test_examples'])}<td>{choice['scorer']}</td>"
            f"<td>{html.escape(choice['reason'])}</td>"
            + "".join(_cell((models[r].get("task_score_by_source") or {}).get(source)) for r in roles)
            + "</tr>"
        )
    generation = metrics["generation"]
    return (
        "<table>"
        + "".join(rows)
        + "</table>"
        + f"<p>Answers were generated with max_new_tokens {generation['max_new_tokens']} "
        f"({html.escape(generation['rule'])}): {generation.get('references_fitting', 0)} of "
        f"{generation['references']} test references fit in it.</p>"
    )


def _detector_section(detector: dict, roc: dict | None) -> str:
    if detector.get("auroc") is None:
        return f"<p>Not validated: {html.escape(detector.get('note', ''))}</p>"
    by_kind = "".join(f"<tr><td>{k}</td>{_cell(v)}</tr>" for k, v in detector["auroc_by_kind"].items())
    flagged = "".join(
        f"<tr><td>{k}</td>{_cell(v)}</tr>" for k, v in detector["flagged_share_by_kind"].items() if v is not None
    )
    return (
        f"<p>{detector['examples']} labelled answers built from the test references "
        f"({detector['unsupported']} unsupported). AUROC <b>{detector['auroc']:.3f}</b>; at "
        f"threshold {detector['threshold']}: precision {detector['precision'] or 0:.3f}, recall "
        f"{detector['recall']:.3f}.</p>"
        + (_roc_plot(roc, detector["auroc"]) if roc else "")
        + "<table><tr><th>unsupported kind</th><th>AUROC vs all supported</th></tr>"
        + by_kind
        + "</table>"
        + "<table><tr><th>kind</th><th>share flagged</th></tr>"
        + flagged
        + "</table>"
    )


def _safety_cell(result: dict) -> str:
    mark = "✔" if result["passed"] else "✘"
    return f"<td>{mark} {html.escape(result['answer'])}<br><small>{html.escape(result['why'])}</small></td>"


def _safety_table(details: dict) -> str:
    roles = list(details)
    rows = ["<tr><th>prompt</th><th>expect</th>" + "".join(f"<th>{r}</th>" for r in roles) + "</tr>"]
    for index, item in enumerate(details[roles[0]]["safety"]):
        cells = "".join(_safety_cell(d["safety"][index]) for d in details.values())
        rows.append(f"<tr><td>{html.escape(item['prompt'])}</td><td>{item['expect']}</td>{cells}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def _examples_table(records: list[dict], details: dict) -> str:
    """Test prompts where some model's answer is wrong or flagged, first."""
    roles = list(details)

    def interesting(index):
        return any(d["scores"][index] < 1.0 or d["judged"][index]["hallucinated"] for d in details.values())

    order = sorted(range(len(records)), key=lambda i: not interesting(i))[:EXAMPLES_SHOWN]
    rows = ["<tr><th>prompt</th><th>reference</th>" + "".join(f"<th>{r}</th>" for r in roles) + "</tr>"]
    for index in order:
        cells = ""
        for detail in details.values():
            judged = detail["judged"][index]
            flag = " ⚠ hallucination" if judged["hallucinated"] else ""
            cells += (
                f"<td>{html.escape(detail['answers'][index])}<br><small>task score "
                f"{detail['scores'][index]:.2f}, support {judged['support']:.2f}{flag}</small></td>"
            )
        rows.append(
            f"<tr><td>{html.escape(records[index]['prompt'][:300])}</td>"
            f"<td>{html.escape(records[index]['response'][:300])}</td>{cells}</tr>"
        )
    return "<table>" + "".join(rows) + "</table>"


def write(path: Path, *, metrics: dict, gate: dict, records: list[dict], details: dict, roc: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to PNG
    models = metrics["models"]
    detector = metrics["hallucination_detector"]
    threshold = detector.get("threshold")
    body = [
        "<h1>Flywheel evaluation</h1>",
        f"<p>{metrics['test_examples']:,} test prompts; {metrics['safety_probe_prompts']} safety "
        "probes. Models: "
        + ", ".join(
            f"<b>{html.escape(role)}</b> <code>{html.escape(str(lin['path']))}</code> (md5 {lin['md5']})"
            for role, lin in metrics["lineage"].items()
        )
        + "</p>",
        "<h2>Promotion gate</h2>",
        _gate_section(gate),
        "<h2>Metrics</h2>",
        _quality_plot(models),
        _metrics_table(models),
        "<h2>Task score by source</h2>",
        _scoring_section(metrics),
        "<h2>Hallucination detector</h2>",
        _detector_section(detector, roc),
        "<h3>Support of each model's test answers</h3>",
        _support_plot(details, threshold) if threshold is not None else "",
        "<h2>Safety probe</h2>",
        _safety_table(details),
        "<h2>Example answers</h2>",
        _examples_table(records, details),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Flywheel evaluation</title>"
        f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
