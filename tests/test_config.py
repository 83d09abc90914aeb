"""cog.yaml, requirements and predict.py as `cog build` reads them."""

import ast
import json
import re

import jsonschema
import pytest
import yaml

from idefics_dev.schema import build_schema
from idefics_cog.config import ROOT

COG_SCHEMA = json.loads((ROOT / "tests/data/cog_config_schema_v1.0.json").read_text())


@pytest.fixture(scope="module")
def cog_yaml():
    return yaml.safe_load((ROOT / "cog.yaml").read_text())


def test_cog_yaml_is_valid_against_the_official_schema(cog_yaml):
    jsonschema.validate(cog_yaml, COG_SCHEMA)


def test_cog_yaml_declares_gpu_cuda_python_sdk_and_predictor(cog_yaml):
    build = cog_yaml["build"]
    assert build["gpu"] is True and re.fullmatch(r"\d+\.\d+", build["cuda"])
    assert re.fullmatch(r"3\.\d+", build["python_version"])
    assert build["python_requirements"] == "requirements.txt"
    # Cog's current spelling (cog >= 0.20: `run:`, BaseRunner, run()); `predict:` would log a deprecation.
    assert cog_yaml["run"] == "predict.py:Predictor" and "predict" not in cog_yaml
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().split() if "==" in line)
    assert build["sdk_version"] == pins["cog"]


def test_requirements_are_all_pinned():
    for name in ("requirements.txt", "requirements-dev.txt"):
        lines = [l for l in (ROOT / name).read_text().splitlines() if l.strip() and not l.startswith("#")]
        assert lines and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.+-]+", l) for l in lines), name
    pins = (ROOT / "requirements.txt").read_text()
    for package in ("torch==2.13.0", "transformers==", "peft==", "bitsandbytes==", "accelerate==", "pillow==", "cog==",
                    "coglet==", "urllib3=="):
        assert package in pins
    assert "torchvision" not in pins


def _input_calls():
    tree = ast.parse((ROOT / "predict.py").read_text())
    return [node for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Input"]


def test_every_input_argument_is_a_literal():
    """`cog build` parses predict.py statically: computed arguments would be lost from the schema."""
    calls = _input_calls()
    assert len(calls) >= 12
    for call in calls:
        for keyword in call.keywords:
            ast.literal_eval(keyword.value)  # raises on anything but a literal


def test_every_numeric_input_has_bounds_and_every_input_a_description():
    properties = build_schema()["components"]["schemas"]["Input"]["properties"]
    for name, prop in properties.items():
        assert prop.get("description"), name
        if prop.get("type") in ("integer", "number"):
            assert "minimum" in prop and "maximum" in prop, name


def test_schema_marks_streaming_and_the_concatenated_text_output():
    schema = build_schema()
    assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    output = schema["components"]["schemas"]["Output"]
    assert output["x-cog-array-type"] == "iterator" and output["x-cog-array-display"] == "concatenate"
    assert schema["components"]["schemas"]["template"]["enum"] == ["instruct", "raw"]
    assert "required" not in schema["components"]["schemas"]["Input"]  # `cog predict -i image=@x.png` alone works


def test_cog_yaml_environment_matches_the_settings_defaults(cog_yaml):
    from idefics_cog.config import Settings

    declared = dict(item.split("=", 1) for item in cog_yaml["environment"])
    defaults = Settings.from_env({})
    assert declared["IDEFICS_BASE_WEIGHTS"] == defaults.base_weights
    assert declared["IDEFICS_ADAPTER_WEIGHTS"] == defaults.adapter_weights
    assert declared["IDEFICS_QUANTIZATION"] == defaults.quantization
    assert declared["IDEFICS_CACHE_DIR"] == "/src/weights"  # weights/ of the repository inside the image
    assert declared["IDEFICS_MAX_BATCH"] == str(defaults.max_batch)


def _predict_node() -> ast.AsyncFunctionDef:
    tree = ast.parse((ROOT / "predict.py").read_text())
    (predictor,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Predictor"]
    (run,) = [node for node in predictor.body if getattr(node, "name", None) == "run"]
    assert isinstance(run, ast.AsyncFunctionDef), "run must be `async def` for COG_MAX_CONCURRENCY > 1"
    assert not any(getattr(node, "name", None) == "predict" for node in predictor.body)  # deprecated spelling
    return run


def test_concurrency_is_one_number_everywhere(cog_yaml):
    """cog.yaml's concurrency.max (COG_MAX_CONCURRENCY in the image, what cog 0.23.1 reads), predict's
    @cog.concurrent(max=...) (what newer Cog reads) and the batch size IDEFICS_MAX_BATCH are the same number."""
    from idefics_cog.config import Settings

    concurrency = cog_yaml["concurrency"]
    assert concurrency["max"] > 1 and 1 <= concurrency["default_target"] <= concurrency["max"]
    declared = dict(item.split("=", 1) for item in cog_yaml["environment"])
    assert int(declared["IDEFICS_MAX_BATCH"]) == Settings.from_env({}).max_batch == concurrency["max"]
    decorators = {ast.unparse(d) for d in _predict_node().decorator_list}
    assert decorators == {"cog.streaming", f"cog.concurrent(max={concurrency['max']})"}


def test_predict_is_async_and_returns_a_generator_to_stream():
    """coglet runs several predictions at once only for an async predict, and streams live what it returns as a
    plain generator (an async generator's chunks it collects until the end): so an `async def` that returns one."""
    import inspect
    import typing

    import cog
    import predict

    assert issubclass(predict.Predictor, cog.BaseRunner) and not issubclass(predict.Predictor, cog.BasePredictor)
    assert inspect.iscoroutinefunction(predict.Predictor.run)
    assert not inspect.isasyncgenfunction(predict.Predictor.run)
    assert predict.Predictor.run.__cog_concurrent_max__ == 16
    assert typing.get_type_hints(predict.Predictor.run)["return"] == cog.ConcatenateIterator[str]
    assert not any(isinstance(node, (ast.Yield, ast.YieldFrom)) for node in ast.walk(_predict_node()))


def test_one_schema_serves_predict_and_train():
    """As `cog build` writes it: both routes, and Cog's component names for each mode."""
    schema = build_schema()
    assert set(schema["paths"]) == {"/predictions", "/trainings"}
    components = schema["components"]["schemas"]
    assert {"Input", "Output", "TrainingInput", "TrainingOutput"} <= set(components)
    assert components["TrainingOutput"]["properties"]["weights"]["format"] == "uri"
    assert components["TrainingInput"]["properties"]["quantization"]["allOf"] == [
        {"$ref": "#/components/schemas/Trainingquantization"}]
    assert "x-cog-streaming" not in schema["paths"]["/trainings"]["post"]


def test_cog_yaml_installs_pget_pinned(cog_yaml):
    """download.py hands archive URLs to pget when it is on PATH: the image installs a pinned release."""
    (install,) = [command for command in cog_yaml["build"]["run"] if "pget" in command]
    assert re.search(r"github\.com/replicate/pget/releases/download/v\d+\.\d+\.\d+/", install)
    assert "/usr/local/bin/pget" in install and "chmod +x /usr/local/bin/pget" in install


def test_cog_managed_yaml_is_cog_yaml_plus_the_managed_weights(cog_yaml):
    """cog.yaml has no `weights:` (the cog CLI refuses one without weights.lock, so `cog predict` would fail on a
    fresh clone); cog.managed.yaml is cog.yaml with them, nothing else, and valid against the official schema."""
    managed = yaml.safe_load((ROOT / "cog.managed.yaml").read_text())
    jsonschema.validate(managed, COG_SCHEMA)
    assert "weights" not in cog_yaml
    assert {key: value for key, value in managed.items() if key != "weights"} == cog_yaml
    assert [entry["source"]["uri"] for entry in managed["weights"]] == [
        "hf://HuggingFaceM4/idefics-9b-instruct", "hf://WinterSchool/Midefics-lora-v3"]


def test_cog_yaml_managed_weights_serve_the_default_settings(tmp_path):
    """A lock as `cog weights import -f cog.managed.yaml` would write it from its `weights:` is found for the
    default IDEFICS_BASE_WEIGHTS and IDEFICS_ADAPTER_WEIGHTS, at the declared targets."""
    from idefics_cog.weights.weights_lock import WeightsLock, set_digest
    from idefics_cog.config import Settings

    declared = yaml.safe_load((ROOT / "cog.managed.yaml").read_text())["weights"]
    assert len({entry["target"] for entry in declared}) == len(declared)
    assert all(entry["target"].startswith("/src/weights/managed/") for entry in declared)
    (tmp_path / "weights.lock").write_text(json.dumps({"version": 1, "weights": [
        {"name": entry["name"], "target": entry["target"], "setDigest": set_digest([]), "files": [],
         "sources": [{"uri": entry["source"]["uri"], "fingerprint": "commit:" + "0" * 40}]} for entry in declared]}))
    lock, defaults = WeightsLock.read(tmp_path / "weights.lock", tmp_path), Settings.from_env({})
    found = [lock.find(defaults.base_weights), lock.find(defaults.adapter_weights)]
    assert [str(weight.target) for weight in found] == [entry["target"] for entry in declared]


def test_cache_memory_fraction_and_warmup_are_read_and_checked():
    from idefics_cog.config import Settings

    defaults = Settings.from_env({})
    assert defaults.gpu_memory_fraction == 0.9 and defaults.warmup is True
    chosen = Settings.from_env({"IDEFICS_CACHE_MEMORY_FRACTION": "0.5", "IDEFICS_WARMUP": "0"})
    assert chosen.gpu_memory_fraction == 0.5 and chosen.warmup is False
    for bad, message in (("1.5", "must be at most 1"), ("0", "must be positive"), ("x", "is not a number")):
        with pytest.raises(ValueError, match=f"IDEFICS_CACHE_MEMORY_FRACTION=.* {message}"):
            Settings.from_env({"IDEFICS_CACHE_MEMORY_FRACTION": bad})
    with pytest.raises(ValueError, match="IDEFICS_WARMUP must be 0 or 1, got 'maybe'"):
        Settings.from_env({"IDEFICS_WARMUP": "maybe"})


def test_every_setting_is_in_the_readme():
    """Each IDEFICS_* variable the settings read is documented (README, "Main settings" and its list of limits)."""
    variables = set(re.findall(r"IDEFICS_[A-Z_]+", (ROOT / "src/idefics_cog/config.py").read_text()))
    readme = (ROOT / "README.md").read_text()
    assert variables and [v for v in sorted(variables) if f"`{v}`" not in readme] == []
