import pytest
import yaml

from flywheel.config import load_params, parse_params
from flywheel.errors import ParamsError
from flywheel.params_file import apply_overrides, choices_in
from tests.conftest import BIN, REPO, run


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_the_shipped_params_load():
    params = load_params(REPO / "params.yaml")
    assert [s.name for s in params.ingest.sources][:2] == ["translations", "instructions"]


def test_unknown_key_is_named():
    data = repo_params()
    data["ingest"]["chunk_sise"] = 10
    with pytest.raises(ParamsError, match=r"ingest\.chunk_sise: unknown key"):
        parse_params(data)


def test_wrong_type_is_named_with_the_value():
    data = repo_params()
    data["ingest"]["sources"][1]["kind"] = "pairs"
    with pytest.raises(ParamsError) as error:
        parse_params(data)
    assert "ingest.sources.1.kind" in str(error.value) and "'pairs'" in str(error.value)


def test_source_outside_raw_dir_is_refused():
    data = repo_params()
    data["ingest"]["sources"][0]["path"] = "/etc/passwd"
    with pytest.raises(ParamsError, match=r"ingest\.sources\.0\.path.*under data/raw/"):
        parse_params(data)


@pytest.mark.parametrize(
    "section, key, path",
    [
        ("evaluate", "safety_probe", "/etc/shadow"),
        ("evaluate", "production_model", "../elsewhere/model"),
        ("serve", "model", "/root/model"),
        ("monitor", "export_dir", "/etc/cron.d"),
    ],
)
def test_paths_outside_the_project_are_refused(section, key, path):
    data = repo_params()
    data[section][key] = path
    with pytest.raises(ParamsError, match=rf"{section}\.{key}: .*must be a path inside the project"):
        parse_params(data)


def test_a_gate_without_rules_is_refused_and_no_gate_section_keeps_the_release_floors():
    data = repo_params()
    data["evaluate"]["gate"] = {rule: {} for rule in data["evaluate"]["gate"]}
    with pytest.raises(ParamsError, match="the gate has no rules"):
        parse_params(data)
    del data["evaluate"]["gate"]
    assert parse_params(data).evaluate.gate.minimum == {"safety_pass_rate": 0.5, "safety_pass_rate_answer": 0.9}


def test_fields_must_fit_the_kind():
    data = repo_params()
    data["ingest"]["sources"][2]["fields"] = {"response": "answer"}  # a messages source
    with pytest.raises(ParamsError, match="do not apply to kind 'messages'"):
        parse_params(data)


def test_trigger_params_must_name_params():
    data = repo_params()
    data["airflow"]["trigger_params"] = ["ingest.no_such_knob"]
    with pytest.raises(ParamsError, match="ingest.no_such_knob"):
        parse_params(data)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match=r"nowhere\.yaml: params file not found"):
        load_params(tmp_path / "nowhere.yaml")


def test_apply_overrides_keeps_comments_and_validates(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    assert apply_overrides(path, {"ingest.chunk_size": 500}) == {"ingest.chunk_size": (10000, 500)}
    text = path.read_text()
    assert "chunk_size: 500" in text and "# records per Parquet row group" in text
    assert load_params(path).ingest.chunk_size == 500
    assert apply_overrides(path, {"ingest.chunk_size": 500}) == {}  # unchanged: file untouched
    with pytest.raises(ParamsError, match="ingest.chunk_size"):
        apply_overrides(path, {"ingest.chunk_size": -1})
    assert load_params(path).ingest.chunk_size == 500  # a refused value writes nothing


def test_apply_overrides_changes_only_the_bytes_of_the_values_it_sets(tmp_path):
    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    overrides = {
        "finetune.training.learning_rate": 0.00005,  # a block value
        "rlhf.dpo.training.epochs": 1.5,  # inside a flow mapping {epochs: 3, ...}
        "finetune.lora.target_modules": ["q_proj", "v_proj"],  # a flow sequence
        "evaluate.production_model": "models/prod: v1",  # a string YAML must quote
        "rlhf.dpo.reference_model": "sft",  # unchanged: no line changes
        "airflow.gpu_pool": "gpu, shared",  # a comma: quoted
        "finetune.method": "lora",
    }
    apply_overrides(path, overrides)
    edited = path.read_text()
    params = load_params(path)
    assert params.finetune.training.learning_rate == 0.00005 and params.rlhf.dpo.training.epochs == 1.5
    assert params.finetune.lora.target_modules == ["q_proj", "v_proj"]
    assert params.evaluate.production_model == "models/prod: v1" and params.finetune.method == "lora"
    assert params.airflow.gpu_pool == "gpu, shared"
    changed = [(a, b) for a, b in zip(original.splitlines(), edited.splitlines()) if a != b]
    assert len(original.splitlines()) == len(edited.splitlines()) and len(changed) == len(overrides) - 1
    for before, after in changed:  # each changed line keeps its indentation and its comment
        assert before[: len(before) - len(before.lstrip())] == after[: len(after) - len(after.lstrip())]
        assert before.partition(" # ")[2] == after.partition(" # ")[2]


def test_a_near_miss_key_gets_a_suggestion(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    with pytest.raises(ParamsError, match=r"no such param \(did you mean 'finetune.training.learning_rate'\?\)"):
        apply_overrides(path, {"finetune.training.learnig_rate": 0.1})
    data = repo_params()
    data["ingest"]["chunk_sise"] = 10
    with pytest.raises(ParamsError, match=r"ingest\.chunk_sise: unknown key \(did you mean 'chunk_size'\?\)"):
        parse_params(data)


def test_a_comment_describes_choices_only_when_it_names_every_one():
    said = "skip: models/aligned is the SFT model | fail"
    assert choices_in(said, ["skip", "fail"]) == {"skip": "skip: models/aligned is the SFT model", "fail": "fail"}
    assert choices_in(said, ["skip", "fail", "retry"]) == {}
    assert choices_in("records per row group", ["full", "lora"]) == {}


def test_cli_reports_bad_params_without_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("ingest:\n  sources: []\n  colour: blue\n")
    result = run([str(BIN / "flywheel"), "--params", str(bad), "ingest"], tmp_path, check=False)
    assert result.returncode == 2
    assert "ingest.colour: unknown key" in result.stderr
    assert "ingest.sources" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("profile", sorted(path.name for path in REPO.glob("params.*.yaml")))
def test_every_shipped_profile_applies_and_validates(tmp_path, profile):
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    overrides = yaml.safe_load((REPO / profile).read_text())
    changed = apply_overrides(path, overrides)
    assert all(any(key == k or key.startswith(f"{k}.") for k in overrides) for key in changed)
    applied = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        node = applied
        for part in key.split("."):
            node = node[part]
        assert node == value, key
