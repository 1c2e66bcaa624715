"""The `flywheel` command (also `python -m flywheel`).

Stage modules are imported only when their command runs, so `flywheel --help` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from flywheel.errors import FlywheelError

# name -> (module, one-line description). dvc.yaml runs each as `flywheel <name>`.
STAGES: dict[str, tuple[str, str]] = {
    "ingest": ("flywheel.data.ingest",
               "read the raw sources in data/raw into canonical Parquet, quarantining bad items"),
    "clean": ("flywheel.data.clean",
              "normalise, redact PII, filter by quality, remove exact and near duplicates"),
    "validate": ("flywheel.data.validate",
                 "run the Great Expectations suite on the cleaned records; write Data Docs"),
    "split": ("flywheel.data.split",
              "split train/eval/test by id hash; drop train records that leak eval/test"),
    "finetune": ("flywheel.training.finetune",
                 "supervised fine-tuning (TRL, DeepSpeed-ready) of the base model -> models/sft"),
    "preferences": ("flywheel.training.preferences",
                    "preference pairs from ingest, serving feedback and the SFT model's own samples"),
    "reward": ("flywheel.training.reward",
               "train a reward model on the preference pairs (TRL RewardTrainer) -> models/reward"),
    "rlhf": ("flywheel.training.rlhf",
             "align the SFT model with the pairs: DPO, or reward model + GRPO/RLOO -> models/aligned"),
    "evaluate": ("flywheel.evaluation.evaluate",
                 "candidate vs SFT vs production: quality, hallucination, safety, latency; the gate"),
}
TOOLS: dict[str, str] = {
    "params": "show the typed params, or apply dotted overrides to params.yaml",
    "run": "an Airflow training run as a DVC experiment: start (params for this run only), save, promote",
    "models": "the model registry (GTO tags): list versions; register the evaluated run; assign stages",
    "export-feedback": "write the request log's feedback to data/raw/feedback/ for the preferences stage",
    "make-sample": "regenerate the bundled sample data under data/raw/sample/",
}
# What happens to a registered version after the pipeline: image, rollout, what serves.
RELEASE: dict[str, str] = {
    "package": "build the serving image of a registered version (Docker; hermetic, from a host wheelhouse)",
    "deploy": "health-gated rollout of a registered version (local | docker | kubernetes); prod on success",
    "status": "what is deployed: version, target, URL, health",
    "undeploy": "stop the deployed version and its endpoint",
    "monitor": "judge the deployed model's recent traffic (drift, quality, operations); ask for retraining",
}
SERVICES: dict[str, str] = {
    "serve": "serve a model over an OpenAI-compatible HTTP API, logging every request (see serve in params.yaml)",
    "airflow": "start Airflow locally (standalone, dags/ as the DAG folder) and print URL and login",
    "router": "the stable endpoint deploy keeps in front of the serving version (started by deploy)",
}
METRICS_DIR = Path("metrics")


def _epilog() -> str:
    def block(title: str, entries: dict[str, str]) -> str:
        return title + "\n" + "\n".join(f"  {name:<13} {text}" for name, text in entries.items())

    stages = {name: text for name, (_, text) in STAGES.items()}
    return "\n\n".join([
        block("pipeline stages (each writes metrics/<stage>.json; `dvc repro` runs them in order):",
              stages),
        block("tools:", TOOLS),
        block("release (after `flywheel models register`):", RELEASE),
        block("services:", SERVICES),
        "Run `flywheel <command> --help` for a command's options.",
    ])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flywheel",
        description="Flywheel: raw text to a fine-tuned, aligned, evaluated and deployed model.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, text) in STAGES.items():
        commands.add_parser(name, description=text)

    params = commands.add_parser("params", description=TOOLS["params"])
    params_actions = params.add_subparsers(dest="action", metavar="<action>")
    params_actions.add_parser("show", help="print the validated params as JSON")
    apply = params_actions.add_parser(
        "apply", help="set dotted params in params.yaml after validating them",
        description="Set dotted params (e.g. ingest.chunk_size) in params.yaml, keeping its "
                    "comments. Values are validated against the typed params first.")
    apply.add_argument("--json", dest="overrides_json", default="{}",
                       help='a JSON object of dotted keys to values, e.g. \'{"ingest.chunk_size": 5000}\'')
    apply.add_argument("assignments", nargs="*", metavar="KEY=VALUE",
                       help="dotted key = YAML value, e.g. ingest.chunk_size=5000")

    runs = commands.add_parser("run", description=TOOLS["run"])
    run_actions = runs.add_subparsers(dest="action", metavar="<action>", required=True)
    start = run_actions.add_parser("start", help="the run's first task: track new feedback exports, "
                                                 "apply the trigger form's params for this run only")
    start.add_argument("run_id", help="the Airflow run id (the experiment's name is made from it)")
    start.add_argument("--run-conf", default=None,
                       help="the run's conf as JSON: its dotted keys are param overrides; other keys "
                            "(e.g. a retraining reason) describe the run and are left alone")
    save = run_actions.add_parser("save", help="after the last stage: dvc exp save, dvc push, "
                                               "params.yaml back as before the run")
    save.add_argument("run_id")
    save.add_argument("--run-conf", default=None, help="recorded in the experiment's message")
    promote = run_actions.add_parser("promote", help="the gate passed: register the run's experiment "
                                                     "commit as a version in staging")
    promote.add_argument("run_id")

    models = commands.add_parser("models", description=TOOLS["models"])
    models.add_argument("--json", action="store_true", help="print the versions as JSON")
    models_actions = models.add_subparsers(dest="action", metavar="<action>")
    models_actions.add_parser("list", help="versions, stages, gate decision, metrics, lineage (default)")
    register = models_actions.add_parser(
        "register", help="register the evaluated run committed at HEAD: staging if the gate "
                         "passed, rejected with its reasons if not")
    register.add_argument("--commit", action="store_true",
                          help="commit the evaluated run first (dvc.lock, params.yaml, metrics/, "
                               "dvclive/, reports/) if it changed")
    assign = models_actions.add_parser("assign", help="move a version to a stage (e.g. prod)")
    assign.add_argument("version", help="e.g. v0.0.1")
    assign.add_argument("stage", help="e.g. staging, prod")

    export = commands.add_parser("export-feedback", description=TOOLS["export-feedback"])
    export.add_argument("--out", default=None,
                        help="JSON-lines file (default: data/raw/feedback/export-<UTC time>.jsonl)")
    export.add_argument("--db", default=None, help="SQLAlchemy URL of the request log "
                        "(default: $FLYWHEEL_REQUEST_LOG_URL, else the SQLite file)")

    commands.add_parser("make-sample", description=TOOLS["make-sample"])

    package = commands.add_parser("package", description=RELEASE["package"])
    package.add_argument("version", nargs="?", help="default: the newest version in staging")
    package.add_argument("--base-image", default=None, help="default: package.base_image")
    deploy = commands.add_parser("deploy", description=RELEASE["deploy"])
    deploy.add_argument("version", nargs="?", help="default: the newest version in staging")
    deploy.add_argument("--target", choices=("local", "docker", "kubernetes"), default=None,
                        help="default: deploy.target")
    deploy.add_argument("--model", default=None,
                        help="deploy this model directory instead of a registered version "
                             "(local target; the registry is left alone)")
    status = commands.add_parser("status", description=RELEASE["status"])
    status.add_argument("--json", action="store_true")
    commands.add_parser("undeploy", description=RELEASE["undeploy"])
    monitor = commands.add_parser("monitor", description=RELEASE["monitor"])
    monitor.add_argument("--db", default=None, help="SQLAlchemy URL of the request log "
                         "(default: $FLYWHEEL_REQUEST_LOG_URL, else the SQLite file)")
    serve = commands.add_parser("serve", description=SERVICES["serve"])
    serve.add_argument("--host", default=None, help="default: serve.host in params.yaml")
    serve.add_argument("--port", type=int, default=None, help="default: serve.port in params.yaml")
    serve.add_argument("--model", default=None, help="a model directory (default: serve.model)")

    router = commands.add_parser("router", description=SERVICES["router"])
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, required=True)
    router.add_argument("--route", required=True, help="the JSON file naming the backend")

    airflow = commands.add_parser("airflow", description=SERVICES["airflow"])
    airflow.add_argument("--port", type=int, default=8080)
    airflow.add_argument("--setup-only", action="store_true",
                         help="migrate the metadata database (the one AIRFLOW_HOME or "
                              "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN names) and create the GPU pool, then exit")
    return parser


def run_stage(name: str, params_path: str) -> None:
    from flywheel.config import load_params
    from flywheel.errors import StageFailed
    from flywheel.io import write_json

    params = load_params(params_path)
    module = importlib.import_module(STAGES[name][0])
    try:
        metrics = module.run(params)
    except StageFailed as failure:
        write_json(METRICS_DIR / f"{name}.json", failure.metrics)
        raise
    if metrics is None:
        return  # a launched worker other than rank 0: rank 0 writes the outputs
    write_json(METRICS_DIR / f"{name}.json", metrics)
    print(module.report(metrics))


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


def _run_conf_overrides(run_conf: dict) -> dict:
    """The param overrides in an Airflow run's conf: its dotted keys (the trigger form's fields)."""
    overrides = {key: value for key, value in run_conf.items() if "." in key}
    for key in sorted(set(run_conf) - set(overrides)):
        print(f"run conf {key}={run_conf[key]!r} (not a param; recorded with the run only)")
    return overrides


def _parse_overrides(args: argparse.Namespace) -> dict:
    import yaml

    overrides = _json_object(args.overrides_json, "--json")
    for assignment in args.assignments:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise FlywheelError(f"expected KEY=VALUE, got {assignment!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def params_command(args: argparse.Namespace) -> None:
    from flywheel.config import apply_overrides, load_params

    if args.action == "apply":
        changes = apply_overrides(args.params, _parse_overrides(args))
        if not changes:
            print(f"{args.params}: no change")
        for key, (old, new) in changes.items():
            print(f"{args.params}: {key}: {old!r} -> {new!r}")
    else:
        print(json.dumps(load_params(args.params).model_dump(by_alias=True), indent=2, default=str))


def run_command(args: argparse.Namespace) -> None:
    from flywheel.orchestration import runs
    from flywheel.config import load_params

    name = runs.experiment_name(args.run_id)
    if args.action == "start":
        run_conf = _json_object(args.run_conf, "--run-conf")
        export_dir = load_params(args.params).monitor.export_dir
        result = runs.start(name, _run_conf_overrides(run_conf), export_dir)
    elif args.action == "save":
        result = runs.save(name, _json_object(args.run_conf, "--run-conf"))
    else:
        result = runs.promote(name)
    print(runs.report(args.action, result))


def models_command(args: argparse.Namespace) -> None:
    from flywheel.release import registry

    if args.action == "register":
        entry = registry.register(commit=args.commit)
        what = "already registered as" if entry["already_registered"] else "registered"
        print(f"{registry.ARTIFACT} {what} {entry['version']} "
              f"(stage: {', '.join(entry['stages'])}) at commit {entry['commit'][:10]}")
        print(entry["message"])
    elif args.action == "assign":
        registry.assign(args.version, args.stage)
        print(f"{registry.ARTIFACT} {args.version} -> {args.stage}")
    else:
        listed = registry.versions()
        print(json.dumps(listed, indent=2, default=str) if args.json else registry.describe(listed))


def export_feedback_command(args: argparse.Namespace) -> None:
    from datetime import datetime, timezone

    from flywheel.serving.request_log import RequestLog

    out = Path(args.out or f"data/raw/feedback/export-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.jsonl")
    log = RequestLog(args.db)
    try:
        count = log.export_feedback(out)
    finally:
        log.close()
    print(f"wrote {count:,} feedback events to {out} (the preferences stage reads data/raw/feedback/*.jsonl)")


def release_command(args: argparse.Namespace) -> int:
    from flywheel.release import deploy
    from flywheel.config import load_params

    if args.command == "package":
        from flywheel.release import package

        print(package.report(package.package(load_params(args.params), args.version, args.base_image)))
    elif args.command == "deploy":
        print(deploy.report(deploy.deploy(load_params(args.params), args.version, args.target, args.model)))
    elif args.command == "status":
        state = deploy.status()
        print(json.dumps(state, indent=2) if args.json else deploy.describe_status(state))
        return 0 if state["deployed"] else 1
    elif args.command == "monitor":
        from flywheel.monitoring import monitor
        from flywheel.io import write_json
        from flywheel.serving.request_log import RequestLog

        request_log = RequestLog(args.db)
        try:
            result = monitor.run(load_params(args.params), request_log=request_log)
        finally:
            request_log.close()
        write_json(METRICS_DIR / "monitor.json", result)
        print(monitor.report(result))
    elif args.command == "undeploy":
        stopped = deploy.undeploy()
        print(f"stopped {stopped['stopped']} ({stopped['target']})" if stopped["stopped"] else "nothing is deployed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            parser.print_help()
            return 2
        if args.command in STAGES:
            run_stage(args.command, args.params)
        elif args.command == "params":
            params_command(args)
        elif args.command == "run":
            run_command(args)
        elif args.command == "models":
            models_command(args)
        elif args.command == "export-feedback":
            export_feedback_command(args)
        elif args.command in RELEASE:
            return release_command(args)
        elif args.command == "make-sample":
            from flywheel.data import sample

            print(sample_data.write_sample())
        elif args.command == "serve":
            from flywheel.serving import app
            from flywheel.config import load_params

            config = load_params(args.params).serve
            if args.model:
                config = config.model_copy(update={"model": args.model})
            return serve.serve(config, host=args.host, port=args.port)
        elif args.command == "router":
            from flywheel.serving import router

            return router.run(args.host, args.port, Path(args.route))
        elif args.command == "airflow":
            from flywheel.orchestration import airflow_local
            from flywheel.config import load_params

            config = load_params(args.params).airflow
            if args.setup_only:
                airflow_local.setup(config)
                return 0
            return airflow_local.standalone(config, port=args.port)
    except FlywheelError as error:
        print(f"flywheel {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flywheel {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
