"""`idefics-cog`, the one command-line tool: `tokens` on the genuine LLaMA vocabulary (reference ids from
tests/data/reference_ids.json), `download` and `evaluate` reached through it, each `--help` with an example."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from idefics_cog import cli
from idefics_cog.config import ROOT
from idefics_cog.errors import InputError
from tests.support.helpers import noise_image

DATA = Path(__file__).parent / "data"
LLAMA = DATA / "llama_tokenizer"
CASES = {case["name"]: case for case in json.loads((DATA / "reference_ids.json").read_text(encoding="utf-8"))["cases"]}
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json"]
CONSOLE_SCRIPT = Path(sys.executable).parent / "idefics-cog"  # `make install` puts it in .venv/bin


# --- the `idefics-cog tokens` command ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory):
    """A checkpoint folder with the tokenizer and preprocessor files only (no config, no weights)."""
    folder = tmp_path_factory.mktemp("tokenizer-only")
    for name in TOKENIZER_FILES:
        shutil.copy(LLAMA / name, folder / name)
    return folder


def run_cli(capsys, *argv):
    code = cli.main(["tokens", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_tokens_command_prints_the_ids_the_model_sees(capsys, tokenizer_only, tmp_path):
    case = CASES["medidefics_template"]
    image = tmp_path / "x.png"
    noise_image(0).save(image)
    code, out, _ = run_cli(capsys, "--base", tokenizer_only, "--prompt", case["prompt"], "--image", image)
    assert code == 0
    result = json.loads(out)
    assert result["input_ids"] == case["input_ids"]
    assert result["pieces"] == case["tokens"]


def test_tokens_command_templates_and_system_prompt(capsys, tokenizer_only):
    case = CASES["raw_system_prompt_multi_turn"]
    image = ROOT / "examples" / "xray.png"
    code, out, _ = run_cli(capsys, "--base", tokenizer_only, "--prompt", case["prompt"], "--template", "raw",
                           "--system-prompt", case["system_prompt"], "--image", image)
    assert code == 0 and json.loads(out)["input_ids"] == case["input_ids"]


@pytest.mark.parametrize("argv, message", [
    (["--base", "{missing}", "--prompt", "hi"], "base: "),
    (["--base", "{base}", "--prompt", "a<image>b<image>", "--image", "{image}"], "prompt: has 2 <image>"),
    (["--base", "{base}", "--prompt", "hi", "--image", "{text}"], "image[0]: "),
    (["--base", "{base}", "--prompt", "hi", "--image", "{missing}"], "image[0]: "),
])
def test_tokens_command_refuses_bad_input_naming_it(capsys, tokenizer_only, tmp_path, argv, message):
    (tmp_path / "notes.txt").write_text("not an image")
    noise_image(0).save(tmp_path / "x.png")
    names = {"base": tokenizer_only, "missing": tmp_path / "missing", "image": tmp_path / "x.png",
             "text": tmp_path / "notes.txt"}
    code, out, err = run_cli(capsys, *[a.format(**names) for a in argv])
    assert code == 2 and out == ""
    assert message in err


def test_tokens_command_needs_the_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="tokenizer.json"):
        cli.tokens(tmp_path, "hi", [])


@pytest.mark.slow
def test_tokens_command_runs_as_a_module(tokenizer_only):
    """`python -m idefics_cog.cli` (what the `idefics-cog` console script calls): JSON on stdout, exit code 2 on
    bad input with the reason on stderr."""
    case = CASES["raw_text_only"]
    run = [sys.executable, "-m", "idefics_cog.cli", "tokens", "--prompt", case["prompt"]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    ok = subprocess.run([*run, "--base", str(tokenizer_only), "--template", "raw"], capture_output=True, text=True,
                        env=env, check=False)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["input_ids"] == case["input_ids"]
    bad = subprocess.run([*run, "--base", str(tokenizer_only / "nowhere")], capture_output=True, text=True,
                         env=env, check=False)
    assert bad.returncode == 2 and "base: " in bad.stderr and bad.stdout == ""


# --- one tool: its commands, their help, the aliases ----------------------------------------------------------


@pytest.mark.slow
def test_the_console_script_lists_every_command_with_examples():
    out = subprocess.run([str(CONSOLE_SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    examples = out.split("examples:", 1)[1]
    for command in ("tokens", "download", "evaluate"):
        assert f"idefics-cog {command}" in examples
    assert "{tokens,download,evaluate}" in out


@pytest.mark.parametrize("command", ["tokens", "download", "evaluate"])
def test_each_command_has_help_with_an_example(capsys, command):
    with pytest.raises(SystemExit) as exit:
        cli.main([command, "--help"])
    out = capsys.readouterr().out
    assert exit.value.code == 0
    assert out.startswith(f"usage: idefics-cog {command}")
    assert f"idefics-cog {command}" in out.split("example", 1)[1]


def test_evaluate_through_the_tool_checks_its_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        cli.main(["evaluate", str(tmp_path / "missing.zip")])
    assert exit.value.code == 2
    assert "idefics-cog evaluate: error: dataset: " in capsys.readouterr().err


@pytest.mark.slow
def test_download_through_the_tool_resolves_the_configured_weights(tiny_dir, tmp_path):
    """A local folder resolves to itself (no network); the adapter `none` is skipped."""
    env = {**os.environ, "IDEFICS_BASE_WEIGHTS": str(tiny_dir / "base"), "IDEFICS_ADAPTER_WEIGHTS": "none",
           "IDEFICS_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([str(CONSOLE_SCRIPT), "download"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"base: {tiny_dir / 'base'} -> {tiny_dir / 'base'}"


@pytest.mark.parametrize("module, prog", [("idefics_cog.weights", "python -m idefics_cog.weights"),
                                          ("idefics_cog.evaluation.run", "python -m idefics_cog.evaluation.run")])
@pytest.mark.slow
def test_the_module_forms_stay_as_aliases(module, prog):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env,
                          check=True)
    assert done.stdout.startswith(f"usage: {prog}")
