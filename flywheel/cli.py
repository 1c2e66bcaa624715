"""The `flywheel` command (also `python -m flywheel`).

Every command registers itself below with `@command`: its name, its group in `flywheel --help`,
a one-line summary and its arguments; adding a command is adding one function. Handlers import
what they run only when they run, so `flywheel --help` stays instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from flywheel.errors import FlywheelError

# name -> (module, one-line description). dvc.yaml runs each as `flywheel <name>`; each module's
# run(params) returns the metrics written to metrics/<name>.json.
STAGES: dict[str, tuple[str, str]] = {
    "ingest": (
        "flywheel.data.ingest",
        "read the raw sources in data/raw into canonical Parquet, quarantining bad items",
    ),
    "clean": ("flywheel.data.clean", "normalise, redact PII, filter by quality, remove exact and near duplicates"),
    "validate": ("flywheel.data.validate", "run the Great Expectations suite on the cleaned records; write Data Docs"),
    "split": ("flywheel.data.split", "split train/eval/test by id hash; drop train records that leak eval/test"),
    "base": (
        "flywheel.training.base",
        "import finetune.base_model (tiny, smollm2, a .gguf, a model dir, a hub id) -> models/base",
    ),
    "retain": (
        "flywheel.training.retain",
        "answer general prompts with the base model, kept in SFT against forgetting -> data/processed/retain.parquet",
    ),
    "finetune": (
        "flywheel.training.finetune",
        "supervised fine-tuning (TRL, DeepSpeed-ready) of the base model -> models/sft",
    ),
    "preferences": (
        "flywheel.training.preferences",
        "preference pairs from ingest, serving feedback and the SFT model's own samples",
    ),
    "reward": (
        "flywheel.training.reward",
        "train a reward model on the preference pairs (TRL RewardTrainer) -> models/reward",
    ),
    "rlhf": (
        "flywheel.training.rlhf",
        "align the SFT model with the pairs: DPO, or reward model + GRPO/RLOO -> models/aligned",
    ),
    "evaluate": (
        "flywheel.evaluation.evaluate",
        "candidate vs SFT vs production: quality, hallucination, safety, latency; the gate",
    ),
    "summary": (
        "flywheel.evaluation.summary",
        "the numbers runs are compared by, in metrics/summary.json (the DVC metric)",
    ),
}

# The groups of `flywheel --help`, in order.
GROUPS = {
    "stage": "pipeline stages (each writes metrics/<stage>.json; `dvc repro` runs them in order)",
    "tool": "tools",
    "release": "release (after `flywheel models register`)",
    "service": "services",
}


@dataclass(frozen=True)
class Command:
    name: str
    group: str
    summary: str
    configure: Callable[[argparse.ArgumentParser], None]
    handle: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, group: str, summary: str, configure: Callable[[argparse.ArgumentParser], None] = None):
    """Register the decorated function as `flywheel <name>`; `configure` adds its arguments."""

    def register(handle: Callable[[argparse.Namespace], int | None]):
        COMMANDS[name] = Command(name, group, summary, configure or (lambda parser: None), handle)
        return handle

    return register


def _load_params(args: argparse.Namespace):
    from flywheel.config import load_params

    return load_params(args.params)


def _size_threads(params) -> None:
    """Before torch is imported: its pools sized to the CPUs this process may use (flywheel.threads)."""
    from flywheel import threads

    threads.configure(params.runtime.threads)


def _request_log_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        default=None,
        help="SQLAlchemy URL of the request log (default: $FLYWHEEL_REQUEST_LOG_URL, else the SQLite file)",
    )


# ---------------------------------------------------------------------------------------------
# Pipeline stages


def run_stage(name: str, params_path: str) -> None:
    from flywheel import paths
    from flywheel.config import load_params
    from flywheel.errors import StageFailed
    from flywheel.io import write_json

    params = load_params(params_path)
    _size_threads(params)
    module = importlib.import_module(STAGES[name][0])
    started = time.monotonic()
    with _one_run_of(name):
        try:
            metrics = module.run(params)
        except StageFailed as failure:
            write_json(paths.metrics_file(name), failure.metrics)
            raise
    if metrics is None:
        return  # a rank other than 0, or a node other than node 0: rank 0 writes the outputs
    write_json(paths.metrics_file(name), metrics)
    print(module.report(metrics))
    print(f"{name}: took {time.monotonic() - started:.0f} s")


# Stages that resume from checkpoints: two runs at once would delete each other's.
CHECKPOINTED_STAGES = ("finetune", "reward", "rlhf")


def _one_run_of(stage: str):
    """For a checkpointed stage's own process (not a launched rank): one run at a time in this
    project, and none outliving the command that started it."""
    from flywheel.io import exclusive_lock

    if stage not in CHECKPOINTED_STAGES or "LOCAL_RANK" in os.environ:
        return contextlib.nullcontext()
    _die_with_parent()
    return exclusive_lock(Path("models/.checkpoints") / f"{stage}.lock", f"another `flywheel {stage}`")


def _die_with_parent() -> None:
    """Stop (SIGTERM: checkpoints stay resumable) when the parent that started this stage, dvc
    repro or an Airflow task, dies: killed with kill -9, it cannot stop its children, and an
    orphaned trainer would train on alone. A thread watches for the reparenting."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        print(f"the process that started this stage ({parent}) is gone: stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


for _stage, (_, _summary) in STAGES.items():
    command(_stage, "stage", _summary)(lambda args: run_stage(args.command, args.params))


# ---------------------------------------------------------------------------------------------
# Tools


def _json_object(text: str | None, option: str) -> dict:
    if text is None or text.strip() in ("", "null"):
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise FlywheelError(f"{option} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise FlywheelError(f"{option} must be a JSON object of dotted keys to values")
    return value


def _profile(path: str) -> dict:
    """A params profile: a YAML mapping of dotted keys to values (e.g. params.real-data.yaml)."""
    import yaml

    try:
        profile = yaml.safe_load(Path(path).read_text())
    except OSError as error:
        raise FlywheelError(f"--from {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise FlywheelError(f"--from {path} is not valid YAML: {error}") from None
    if not isinstance(profile, dict) or not all(isinstance(key, str) for key in profile):
        raise FlywheelError(f"--from {path} must be a mapping of dotted keys to values")
    return profile


def _parse_overrides(args: argparse.Namespace) -> dict:
    import yaml

    overrides = _profile(args.profile) if args.profile else {}
    overrides.update(_json_object(args.overrides_json, "--json"))
    for assignment in args.assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise FlywheelError(f"expected KEY=VALUE, got {assignment!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def _params_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>")
    actions.add_parser("show", help="print the validated params as JSON")
    apply = actions.add_parser(
        "apply",
        help="set dotted params in params.yaml after validating them",
        description="Set dotted params (e.g. ingest.chunk_size) in params.yaml, keeping its "
        "comments. Values are validated against the typed params first.",
    )
    apply.add_argument(
        "--json",
        dest="overrides_json",
        default="{}",
        help="a JSON object of dotted keys to values, e.g. '{\"ingest.chunk_size\": 5000}'",
    )
    apply.add_argument(
        "--from",
        dest="profile",
        default=None,
        metavar="FILE",
        help="a profile: a YAML mapping of dotted keys to values, applied first (e.g. params.real-data.yaml)",
    )
    apply.add_argument(
        "assignments", nargs="*", metavar="KEY=VALUE", help="dotted key = YAML value, e.g. ingest.chunk_size=5000"
    )


@command("params", "tool", "show the typed params, or apply dotted overrides to params.yaml", _params_arguments)
def params_command(args: argparse.Namespace) -> None:
    from flywheel.params_file import apply_overrides

    if args.action == "apply":
        changes = apply_overrides(args.params, _parse_overrides(args))
        if not changes:
            print(f"{args.params}: no change")
        for key, (old, new) in changes.items():
            print(f"{args.params}: {key}: {old!r} -> {new!r}")
    else:
        print(json.dumps(_load_params(args).model_dump(by_alias=True), indent=2, default=str))


def _run_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    start = actions.add_parser(
        "start",
        help="the run's first task: track new feedback exports, apply the trigger form's params in the run's workspace",
    )
    start.add_argument(
        "--run-conf",
        default=None,
        help="the run's conf as JSON: its dotted keys are param overrides; other keys "
        "(e.g. a retraining reason) describe the run and are recorded with it",
    )
    stage = actions.add_parser("stage", help="run one dvc.yaml stage of the run in a workspace made for it")
    save = actions.add_parser("save", help="after the last stage: the run becomes a DVC experiment in the project")
    promote = actions.add_parser(
        "promote", help="the gate passed: register the run's experiment commit as a version in staging"
    )
    for action in (start, stage, save, promote):
        action.add_argument("run_id", help="the Airflow run id (the run's workspace and experiment are named from it)")
        action.add_argument(
            "--result-file", type=Path, default=None, help="also write the result as JSON here (for the DAG's tasks)"
        )
    stage.add_argument("stage", help="the stage's name in dvc.yaml")


@command(
    "run",
    "tool",
    "an Airflow training run in a workspace of its own, recorded as a DVC experiment: start, stage, save, promote",
    _run_arguments,
)
def run_command(args: argparse.Namespace) -> None:
    from flywheel.config import load_params
    from flywheel.io import write_json
    from flywheel.orchestration import runs
    from flywheel.orchestration.workspace import Locations, StoreError

    name = runs.experiment_name(args.run_id)
    project = Path(os.environ.get("FLYWHEEL_PROJECT_DIR") or ".")
    runs_root = load_params(project / "params.yaml").airflow.runs_root if (project / "params.yaml").is_file() else None
    locations = Locations.from_environment(project, **({"runs_root": runs_root} if runs_root else {}))
    try:
        if args.action == "start":
            result = runs.start(name, _json_object(args.run_conf, "--run-conf"), locations)
        elif args.action == "stage":
            result = runs.stage(name, args.stage, locations)
        elif args.action == "save":
            result = runs.save(name, locations)
        else:
            result = runs.promote(name, locations)
    except (runs.StageFailed, StoreError) as failure:
        print(f"flywheel run: error: {failure}", file=sys.stderr)
        raise SystemExit(1) from None  # retried (a stage that itself exited with 2 is not: see its log)
    if args.result_file:
        write_json(args.result_file, result)
    print(runs.report(args.action, result))


def _sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-p",
        "--param",
        dest="axes",
        action="append",
        required=True,
        metavar="KEY=V1,V2",
        help="a trigger-form param and its values; several -p make a grid (one run per combination)",
    )
    parser.add_argument("--wait", action="store_true", help="wait for the runs and list their results")
    parser.add_argument(
        "--promote-best",
        metavar="METRIC",
        help="wait, then promote the best run the gate passed by METRIC ([file:]dotted.key of dvc exp show)",
    )
    parser.add_argument("--minimize", action="store_true", help="for --promote-best: lower is better")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for the runs")


@command(
    "sweep",
    "tool",
    "trigger one flywheel_training run per point of a grid of params through Airflow's API; promote the best",
    _sweep_arguments,
)
def sweep_command(args: argparse.Namespace) -> None:
    from flywheel.orchestration import runs, sweep
    from flywheel.orchestration.workspace import Locations

    params = _load_params(args)
    points = sweep.grid(args.axes, params.airflow.trigger_params)
    api = sweep.AirflowApi.from_environment()
    run_ids = []
    for point in points:
        run_ids.append(api.trigger(point))
        print(f"triggered {run_ids[-1]}: {json.dumps(point)}", flush=True)
    names = [runs.experiment_name(run_id) for run_id in run_ids]
    print(f"{len(run_ids)} runs (up to airflow.max_active_runs={params.airflow.max_active_runs} at once)")
    if not (args.wait or args.promote_best):
        print("see them side by side as they finish: dvc exp show --all-commits")
        return
    states = sweep.wait(api, run_ids, args.timeout)
    print("\n".join(f"  {name}: {states[run_id]}" for name, run_id in zip(names, run_ids, strict=True)))
    listed = runs.experiments(Path("."))
    if args.promote_best:
        name, value = sweep.best(listed, names, args.promote_best, maximize=not args.minimize)
        print(f"best by {args.promote_best}: {name} ({value:.4g})")
        locations = Locations.from_environment(Path("."), params.airflow.runs_root)
        print(runs.report("promote", runs.promote(name, locations)))


def _models_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the versions as JSON")
    actions = parser.add_subparsers(dest="action", metavar="<action>")
    actions.add_parser("list", help="versions, stages, gate decision, metrics, lineage (default)")
    register = actions.add_parser(
        "register",
        help="register the evaluated run committed at HEAD: staging if the gate "
        "passed, rejected with its reasons if not",
    )
    register.add_argument(
        "--commit",
        action="store_true",
        help="commit the evaluated run first (dvc.lock, params.yaml, metrics/, dvclive/, reports/) if it changed",
    )
    assign = actions.add_parser("assign", help="move a version to a stage (e.g. prod)")
    assign.add_argument("version", help="e.g. v0.0.1")
    assign.add_argument("stage", help="e.g. staging, prod")


@command(
    "models",
    "tool",
    "the model registry (GTO tags): list versions; register the evaluated run; assign stages",
    _models_arguments,
)
def models_command(args: argparse.Namespace) -> None:
    from flywheel.release import registry

    if args.action == "register":
        entry = registry.register(commit=args.commit)
        what = "already registered as" if entry["already_registered"] else "registered"
        print(
            f"{registry.ARTIFACT} {what} {entry['version']} "
            f"(stage: {', '.join(entry['stages'])}) at commit {entry['commit'][:10]}"
        )
        print(entry["message"])
    elif args.action == "assign":
        registry.assign(args.version, args.stage)
        print(f"{registry.ARTIFACT} {args.version} -> {args.stage}")
    else:
        listed = registry.versions()
        print(json.dumps(listed, indent=2, default=str) if args.json else registry.describe(listed))


def _request_log_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["replay"], help="replay: write spilled requests into the database")
    parser.add_argument(
        "--dir", default="data/serving", help="where the server spilled them (unwritten-requests-*.jsonl)"
    )
    _request_log_option(parser)


@command(
    "request-log",
    "tool",
    "write back the requests a server kept in files while its database was unreachable",
    _request_log_arguments,
)
def request_log_command(args: argparse.Namespace) -> None:
    from flywheel.serving.request_log import RequestLog

    log = RequestLog(args.db, spill_dir=Path(args.dir))
    try:
        counts = log.replay()
    finally:
        log.close()
    print(
        f"replayed {counts['files']:,} spill files from {args.dir}: {counts['rows']:,} requests written, "
        f"{counts['already_there']:,} already in the log"
    )


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", default=None, help="JSON-lines file (default: data/raw/feedback/export-<UTC time>.jsonl)"
    )
    _request_log_option(parser)


@command(
    "export-feedback",
    "tool",
    "write the request log's feedback to data/raw/feedback/ for the preferences stage",
    _export_arguments,
)
def export_feedback_command(args: argparse.Namespace) -> None:
    from datetime import datetime

    from flywheel.serving.request_log import RequestLog

    out = Path(args.out or f"data/raw/feedback/export-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.jsonl")
    log = RequestLog(args.db)
    try:
        count = log.export_feedback(out)
    finally:
        log.close()
    print(f"wrote {count:,} feedback events to {out} (the preferences stage reads data/raw/feedback/*.jsonl)")


@command("make-sample", "tool", "regenerate the bundled sample data under data/raw/sample/")
def make_sample_command(args: argparse.Namespace) -> None:
    from flywheel.data import sample

    print(sample.write_sample())


def _judge_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input", required=True, help='JSON lines of {"answer", "reference"?, "context"?, "question"?, "label"?}'
    )
    parser.add_argument("--output", default=None, help="JSON lines, one per input row (default: <input>.judged.jsonl)")
    parser.add_argument("--nli-model", default=None, help="a CrossEncoder (NLI) dir (default: hallucination.nli_model)")
    parser.add_argument("--threshold", type=float, default=None, help="default: evaluate.hallucination.threshold")


@command(
    "judge",
    "tool",
    "score answers' support by their reference/context (the hallucination detector) on your own JSONL",
    _judge_arguments,
)
def judge_command(args: argparse.Namespace) -> int:
    from flywheel.evaluation import hallucination, judge

    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise FlywheelError(f"--threshold must be in (0, 1], got {args.threshold}")
    if not Path(args.input).is_file():
        raise FlywheelError(f"--input {args.input} does not exist; give a JSON-lines file of answers")
    config = _load_params(args).evaluate.hallucination
    config = config.model_copy(
        update={"nli_model": args.nli_model or config.nli_model, "threshold": args.threshold or config.threshold}
    )
    source = Path(args.input)
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.judged.jsonl")
    cross_encoder = hallucination.load_cross_encoder(config.nli_model)  # a missing dir fails first
    summary = judge.judge_file(
        source, output, hallucination.load_embedder(config.embedding_model), config, cross_encoder
    )
    print(judge.report(summary))
    return 1 if summary["judged"] + summary["not_judged"] == 0 else 0


# ---------------------------------------------------------------------------------------------
# Release: what happens to a registered version after the pipeline


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="models/aligned", help="the model directory to export")
    source.add_argument(
        "--version", default=None, help="a registered version, into models/releases/<version>-q8_0 (what deploy serves)"
    )
    parser.add_argument("--quant", choices=("q8_0", "f32"), default="q8_0", help="GGUF weight type (default q8_0)")
    parser.add_argument("--out", default=None, help="default: models/export/<model>-<quant>")
    parser.add_argument("--no-judge", action="store_true", help="write the export without measuring it")


@command(
    "export",
    "release",
    "write a smaller serving artifact (GGUF, 8-bit) and judge it against its float model with the gate",
    _export_arguments,
)
def export_command(args: argparse.Namespace) -> int:
    params = _load_params(args)
    _size_threads(params)
    from flywheel import paths
    from flywheel.release import export, package

    if args.version:
        if args.quant != "q8_0" or args.out:
            raise FlywheelError("a registered version is exported as q8_0 into models/releases/ (no --quant, --out)")
        model_dir, out_dir = package.materialise(args.version), package.release_export(args.version)
    else:
        model_dir = Path(args.model)
        out_dir = Path(args.out or paths.EXPORTS / f"{model_dir.name}-{args.quant}")
    description = export.export(model_dir, args.quant, out_dir)
    print(f"export: wrote {out_dir / export.GGUF_FILE} ({description['bytes'] / 1e6:.2f} MB)", flush=True)
    if args.no_judge:
        return 0
    result = export.judge(params, out_dir)
    print(export.report(result))
    return 0 if result["gate"]["passed"] else 1


def _package_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", nargs="?", help="default: the newest version in staging")
    parser.add_argument("--base-image", default=None, help="default: package.base_image")


@command(
    "package",
    "release",
    "build the serving image of a registered version (Docker; hermetic, from a host wheelhouse)",
    _package_arguments,
)
def package_command(args: argparse.Namespace) -> None:
    from flywheel.release import package

    print(package.report(package.package(_load_params(args), args.version, args.base_image)))


def _deploy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", nargs="?", help="default: the newest version in staging")
    parser.add_argument(
        "--target", choices=("local", "docker", "kubernetes"), default=None, help="default: deploy.target"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="deploy this model directory instead of a registered version (local target; the registry is left alone)",
    )


@command(
    "deploy",
    "release",
    "health-gated rollout of a registered version (local | docker | kubernetes); prod on success",
    _deploy_arguments,
)
def deploy_command(args: argparse.Namespace) -> None:
    from flywheel.release import deploy

    print(deploy.report(deploy.deploy(_load_params(args), args.version, args.target, args.model)))


@command(
    "status",
    "release",
    "what is deployed: version, target, URL, health (exit 0 serving, 3 deployed but down, 1 nothing)",
    lambda parser: parser.add_argument("--json", action="store_true"),
)
def status_command(args: argparse.Namespace) -> int:
    from flywheel.release import deploy

    state = deploy.status()
    print(json.dumps(state, indent=2) if args.json else deploy.describe_status(state))
    if not state["deployed"]:
        return 1
    return 0 if deploy.serving(state) else 3  # deployed, but not answering: a probe must see it


@command("undeploy", "release", "stop the deployed version and its endpoint")
def undeploy_command(args: argparse.Namespace) -> None:
    from flywheel.release import deploy

    stopped = deploy.undeploy()
    print(f"stopped {stopped['stopped']} ({stopped['target']})" if stopped["stopped"] else "nothing is deployed")


def _monitor_arguments(parser: argparse.ArgumentParser) -> None:
    _request_log_option(parser)
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="when a check fails, export the window to monitor.export_dir and ask for retraining "
        "(starts the cooldown); the flywheel_monitoring DAG runs it so and starts the training run",
    )


@command(
    "monitor",
    "release",
    "judge the deployed model's recent traffic (drift, quality, operations); with --retrain, ask for retraining",
    _monitor_arguments,
)
def monitor_command(args: argparse.Namespace) -> None:
    params = _load_params(args)
    _size_threads(params)

    from flywheel import paths
    from flywheel.io import write_json
    from flywheel.monitoring import monitor
    from flywheel.serving.request_log import RequestLog

    request_log = RequestLog(args.db)
    try:
        result = monitor.run(params, request_log=request_log, may_retrain=args.retrain)
    finally:
        request_log.close()
    write_json(paths.metrics_file("monitor"), result)
    print(monitor.report(result))


# ---------------------------------------------------------------------------------------------
# Services


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None, help="default: serve.host in params.yaml")
    parser.add_argument("--port", type=int, default=None, help="default: serve.port in params.yaml")
    parser.add_argument("--model", default=None, help="a model directory (default: serve.model)")


@command(
    "serve",
    "service",
    "serve a model over an OpenAI-compatible HTTP API, logging every request (see serve in params.yaml)",
    _serve_arguments,
)
def serve_command(args: argparse.Namespace) -> int:
    params = _load_params(args)
    _size_threads(params)

    from flywheel.serving import app

    config = params.serve
    if args.model:
        config = config.model_copy(update={"model": args.model})
    return app.serve(config, host=args.host, port=args.port)


def _airflow_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--host", default="127.0.0.1", help="the address the UI listens on (0.0.0.0: every network; log in first)"
    )
    parser.add_argument(
        "--setup-only",
        action="store_true",
        help="migrate the metadata database (the one AIRFLOW_HOME or "
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN names) and create the GPU pool, then exit",
    )


@command(
    "airflow",
    "service",
    "start Airflow locally (standalone, dags/ as the DAG folder) and print URL and login",
    _airflow_arguments,
)
def airflow_command(args: argparse.Namespace) -> int:
    from flywheel.orchestration import airflow_local

    config = _load_params(args).airflow
    if args.setup_only:
        airflow_local.setup(config)
        return 0
    return airflow_local.standalone(config, port=args.port, host=args.host)


def _router_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--route", required=True, help="the JSON file naming the backend")


@command(
    "router",
    "service",
    "the stable endpoint deploy keeps in front of the serving version (started by deploy)",
    _router_arguments,
)
def router_command(args: argparse.Namespace) -> int:
    from flywheel.serving import router

    return router.run(args.host, args.port, Path(args.route))


# ---------------------------------------------------------------------------------------------
# The parser and main


def _epilog() -> str:
    blocks = []
    for group, title in GROUPS.items():
        entries = [f"  {c.name:<15} {c.summary}" for c in COMMANDS.values() if c.group == group]
        blocks.append(f"{title}:\n" + "\n".join(entries))
    return "\n\n".join(blocks + ["Run `flywheel <command> --help` for a command's options."])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="Flywheel: raw text to a fine-tuned, aligned, evaluated and deployed model.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for entry in COMMANDS.values():
        entry.configure(subparsers.add_parser(entry.name, description=entry.summary))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command].handle(args) or 0
    except FlywheelError as error:
        print(f"flywheel {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flywheel {args.command}: interrupted", file=sys.stderr)
        return 130
