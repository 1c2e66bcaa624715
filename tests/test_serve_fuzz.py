"""The serving API fuzzed from its own OpenAPI schema (schemathesis): no schema-valid request gets a
5xx. A real `flywheel serve` of the fine-tuned sample model, with a key and a rate limit high
enough that the fuzzer reaches the handlers; a bounded number of examples per operation."""

import contextlib
import shutil
import subprocess

import pytest

from tests.conftest import BIN, REPO, free_port, run, subprocess_env, wait_until_ready

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

KEY = "fuzz-key"
EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def fuzzed_server(trained_sft, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    limits = ["serve.rate_limit_per_minute=100000", "serve.max_tokens=32", "serve.default_max_tokens=16"]
    run([str(BIN / "flywheel"), "params", "apply", *limits], root)
    port = free_port()
    process = subprocess.Popen(
        [str(BIN / "flywheel"), "serve", "--port", str(port), "--model", str(trained_sft / "models/sft")],
        cwd=root,
        env=subprocess_env(FLYWHEEL_API_KEYS=KEY, FLYWHEEL_REQUEST_LOG_URL=f"sqlite:///{root / 'requests.sqlite'}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(f"{base}/readyz", process)
        yield base, process
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait()


def test_no_schema_valid_request_gets_a_5xx(fuzzed_server):
    base, process = fuzzed_server
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"POST /v1/chat/completions", "POST /v1/completions", "POST /v1/feedback"} <= {o.label for o in operations}
    failures: list[str] = []
    answered: list[str] = []  # the generation requests that got an answer: the fuzzer reached the model
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,  # the same examples every run: a failure reproduces
            suppress_health_check=list(hypothesis.HealthCheck),
            database=None,
        )
        def call(case):
            response = case.call(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            if response.status_code == 200 and case.path in ("/v1/chat/completions", "/v1/completions"):
                answered.append(case.path)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text}")

        call()
    assert failures == []
    assert len(answered) >= 10, answered
    assert process.poll() is None
