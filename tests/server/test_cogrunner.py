"""script/predict and script/serve: the local stand-ins for `cog predict` and the container's server."""

import base64
import os
import signal
import subprocess
import sys
import sysconfig
import time

import psutil
import pytest
import requests

from idefics_dev.cogrunner import free_port, parse_inputs
from idefics_dev.schema import build_schema
from idefics_cog.config import ROOT
from tests.conftest import tiny_env
from tests.support.helpers import noise_image, save_png
from tests.support.engine import run


@pytest.fixture(scope="module")
def schema():
    return build_schema()


def test_parse_inputs_types_files_and_lists(schema, tmp_path):
    a, b = save_png(noise_image(1), tmp_path / "a.png"), save_png(noise_image(2), tmp_path / "b.png")
    inputs = parse_inputs(["prompt=x=y", "max_new_tokens=7", "temperature=0.5", f"image=@{a}",
                           f"images=@{a}", f"images=@{b}"], schema)
    assert inputs["prompt"] == "x=y" and inputs["max_new_tokens"] == 7 and inputs["temperature"] == 0.5
    assert inputs["image"] == "data:image/png;base64," + base64.b64encode(a.read_bytes()).decode()
    assert len(inputs["images"]) == 2 and inputs["images"][1].endswith(base64.b64encode(b.read_bytes()).decode())


@pytest.mark.parametrize("stub", ["tests/support/faulty_predict.py:Predictor",
                                  "tests/support/checksum_predict.py:Predictor"])
def test_the_test_predictors_have_the_schema_of_predict_py(schema, stub):
    """Servers started side by side share one .cog/openapi_schema.json: a stub's must not differ (a streaming run
    inherited from predict.py's Predictor is still streaming)."""
    assert build_schema(stub) == schema


def test_reading_the_inputs_imports_no_model_library():
    """predict.py imports torch, transformers and peft in setup(): `cog build` and script/predict read its inputs in
    about a second, not ten."""
    code = ("import sys; from idefics_dev.schema import build_schema; build_schema(); "
            "print(sorted({'torch', 'transformers', 'peft'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stderr


@pytest.mark.parametrize("pair, message", [("nope=1", "unknown input"), ("prompt", "expected name=value"),
                                           ("image=@/no/such.png", "no such file")])
def test_parse_inputs_refuses_mistakes(schema, pair, message):
    with pytest.raises(SystemExit, match=message):
        parse_inputs([pair], schema)


def test_the_runner_passes_cog_yaml_concurrency_unless_the_caller_sets_it(monkeypatch):
    from idefics_dev.cogrunner import CogServer, cog_yaml_concurrency, server_env

    monkeypatch.delenv("COG_MAX_CONCURRENCY", raising=False)
    assert cog_yaml_concurrency() == 16
    assert server_env(5000)["COG_MAX_CONCURRENCY"] == "16"  # what `cog build` bakes into the image
    assert server_env(5000, extra={"COG_MAX_CONCURRENCY": "2"})["COG_MAX_CONCURRENCY"] == "2"
    assert CogServer(env={"COG_MAX_CONCURRENCY": "3"}).concurrency == 3
    # The image's setting reaches `cog train` too (coglet 0.23.1 takes it there only because train() is async).
    assert server_env(5000, mode="train")["COG_MAX_CONCURRENCY"] == "16"
    monkeypatch.setenv("COG_MAX_CONCURRENCY", "4")  # as at `docker run -e COG_MAX_CONCURRENCY=4`
    assert server_env(5000)["COG_MAX_CONCURRENCY"] == "4"


def test_cog_yaml_without_concurrency_leaves_coglet_its_default(tmp_path, monkeypatch):
    from idefics_dev.cogrunner import cog_yaml_concurrency, server_env

    monkeypatch.delenv("COG_MAX_CONCURRENCY", raising=False)
    (tmp_path / "cog.yaml").write_text("build:\n  python_version: '3.11'\npredict: predict.py:Predictor\n")
    assert cog_yaml_concurrency(tmp_path) is None
    assert "COG_MAX_CONCURRENCY" not in server_env(5000, root=tmp_path)


def script(name, *args, env=None, timeout=300):
    return subprocess.run([str(ROOT / "script" / name), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_script_predict_streams_the_answer(tiny_dir, engine, tmp_path):
    image = save_png(noise_image(1), tmp_path / "xray.png")
    done = script("predict", "-i", f"image=@{image}", "-i", "prompt=What does this X-ray show?",
                  "-i", "max_new_tokens=16", "-i", "adapter=none", env=tiny_env(tiny_dir))
    assert done.returncode == 0, done.stderr
    expected = run(engine, "What does this X-ray show?", [noise_image(1)], max_new_tokens=16)
    assert done.stdout == expected + "\n"
    assert "tokens/s" in done.stderr  # the model's logs arrive on stderr


def cog_servers(mark: str) -> int:
    """Cog servers started with RUNNER_TEST_MARK=mark: this test's only (other test workers run servers too)."""
    count = 0
    for process in psutil.process_iter(["cmdline"]):
        try:
            if "cog.server.http" in " ".join(process.info["cmdline"] or []) and \
                    process.environ().get("RUNNER_TEST_MARK") == mark:
                count += 1
        except psutil.Error:  # ended, or not ours to read
            pass
    return count


def test_script_predict_fails_with_the_server_error_and_stops_the_server(tiny_dir, tmp_path):
    image = save_png(noise_image(1), tmp_path / "xray.png")
    mark = tmp_path.name
    command = [str(ROOT / "script" / "predict"), "-i", f"image=@{image}", "-i", "prompt=<image><image>"]
    running = subprocess.Popen(command, env={**os.environ, **tiny_env(tiny_dir), "RUNNER_TEST_MARK": mark}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = 0
    while running.poll() is None and not seen:
        seen = cog_servers(mark)
        time.sleep(0.05)
    _, stderr = running.communicate(timeout=300)
    assert seen == 1  # the script's server was there (so the count below can see one left behind)
    assert running.returncode == 1
    assert "prediction failed" in stderr and "2 <image> placeholder(s) but 1 image(s)" in stderr
    assert cog_servers(mark) == 0


def test_script_predict_without_weights_or_hub_reports_the_setup_failure_and_says_what_to_do(tmp_path):
    """A first try on a machine without the hub: no IDEFICS_BASE_WEIGHTS, an empty cache, a hub that refuses the
    connection (a closed 127.0.0.1 port): it fails at setup, at once, names the setting and the ways to run anyway."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("IDEFICS_", "HF_"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", IDEFICS_CACHE_DIR=str(tmp_path / "cache"))
    started = time.monotonic()
    done = subprocess.run([str(ROOT / "script/predict"), "-i", "prompt=hi"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 1
    assert "SETUP_FAILED" in done.stderr
    assert time.monotonic() - started < 120  # setup's own time; no retries, no timeouts
    assert "IDEFICS_BASE_WEIGHTS=HuggingFaceM4/idefics-9b-instruct: " in done.stderr, done.stderr
    assert "could not be reached" in done.stderr  # why
    for way in ("make predict", "make tiny", "IDEFICS_BASE_WEIGHTS=weights/tiny/base", "HF_ENDPOINT"):
        assert way in done.stderr, done.stderr


def test_an_unreachable_default_adapter_names_its_setting(tiny_dir, tmp_path, monkeypatch):
    from idefics_cog.serving.service import Service
    from idefics_cog.config import Settings
    from idefics_cog.errors import WeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    settings = Settings.from_env({"IDEFICS_BASE_WEIGHTS": str(tiny_dir / "base"), "IDEFICS_CACHE_DIR": str(tmp_path)})
    with pytest.raises(WeightsError, match=r"IDEFICS_ADAPTER_WEIGHTS=WinterSchool/Midefics-lora-v3: .*HF_HUB_OFFLINE is set. "
                                           r"Set IDEFICS_ADAPTER_WEIGHTS to none, an adapter directory"):
        Service.from_settings(settings)


def test_make_install_installs_the_project_editable(tmp_path):
    """`make install` into a fresh venv (its packages borrowed from this one through a .pth: pip finds them all
    installed and fetches only the build backend): the project (idefics_cog and idefics_dev) then imports from src/
    with no PYTHONPATH, and `idefics-cog` is installed."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run(["make", "-C", str(ROOT), f"VENV={venv}", "install"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    show = "import idefics_cog, idefics_dev; print(idefics_cog.__file__); print(idefics_dev.__file__)"
    imported = subprocess.run([str(venv / "bin/python"), "-c", show], capture_output=True, text=True, env=env,
                              cwd=tmp_path)
    # both packages: the product, and the development tools the tests and benchmarks use
    expected = [str(ROOT / "src" / package / "__init__.py") for package in ("idefics_cog", "idefics_dev")]
    assert imported.stdout.split() == expected, imported.stderr
    assert (venv / "bin/idefics-cog").is_file()
    # Installed: nothing left to do, until pyproject.toml changes (`-W`: as if it had just been modified).
    make_q = ["make", "-C", str(ROOT), "-q", f"VENV={venv}", "install"]
    assert subprocess.run(make_q, env=env).returncode == 0
    assert subprocess.run([*make_q, "-W", "pyproject.toml"], env=env).returncode == 1


def test_script_serve_runs_the_server_in_the_foreground(tiny_dir):
    port = free_port()
    env = {**os.environ, "PORT": str(port), "HOST": "127.0.0.1", **tiny_env(tiny_dir)}
    process = subprocess.Popen([str(ROOT / "script/serve")], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/health-check", timeout=2).json()["status"] == "READY":
                    break
            except requests.RequestException:
                time.sleep(0.3)
        schema = requests.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).json()
        assert schema["paths"]["/predictions"]["post"]["x-cog-streaming"] is True
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
