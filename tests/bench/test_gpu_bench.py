"""bench/gpu.sh and bench/gpu_bench.py, the GPU loan's script, on the CPU with the scaled-down idefics-9b shape: the
same entry points and phases as on an H200, so that the script cannot rot between loans (no GPU needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # make test-fast leaves it out

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--device", "cpu", "--size", "tiny", "--new-tokens", "4", "--concurrent-tokens", "4", "--repeats", "1",
        "--concurrent", "2"]  # 2 concurrent requests, 2 mixed-adapter rows of 2 adapters: the code path of 16 and 4


def gpu_bench(*argv: str) -> int:
    """bench/gpu_bench.py as gpu.sh runs it (a script, not a module the tests import)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), *argv], capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.returncode


def test_every_phase_runs_on_the_cpu_and_writes_its_results(tmp_path):
    assert gpu_bench("check", "--out", str(tmp_path), *TINY) == 0
    assert gpu_bench("speed", "--out", str(tmp_path), *TINY) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    check, speed = results["check"], results["speed"]
    assert check["status"] == speed["status"] == "done"
    assert [phase.get("same") for name, phase in check["phases"].items() if name != "build"] == [True, True, 2]
    phases = speed["phases"]
    assert list(phases) == ["build", "first request", "warm-up", "batch 1", "2 concurrent", "mixed adapters"]
    assert not any("skipped" in phase for name, phase in phases.items() if name != "warm-up")
    assert phases["batch 1"]["path"]["path"] == "eager"  # compile="auto": CUDA only
    assert set(phases["batch 1"]["rates"]) == {"recipe (model.generate)", "decode_path='fast'"}
    assert phases["batch 1"]["floor"]["weights"] > 0 and phases["batch 1"]["floor"]["cache"] > 0
    assert phases["mixed adapters"]["largest_batch"] == 2
    assert phases["2 concurrent"]["graphs_compiled"] == 0
    assert "decode_path='fast'" in (tmp_path / "speed.md").read_text()


def run_script(out: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEVICE": "cpu", "SIZE": "tiny", "PYTHON": sys.executable, "WHEELS": str(out / "none"),
           "BENCH_ARGS": " ".join(TINY[4:]), **env}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(out)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_the_script_runs_a_phase_under_its_timeout_and_a_phase_past_its_deadline_is_skipped(tmp_path):
    # The phase's work is tested above; here a deadline already past (the last --deadline wins) keeps it short.
    done = run_script(tmp_path, PHASES="check", BENCH_ARGS=" ".join(TINY[4:] + ["--deadline", "0"]))
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "report.md").read_text()
    assert "- check: exit 0" in report and "Greedy check" in report and "build" in report and "skipped" in report
    check = json.loads((tmp_path / "results.json").read_text())["check"]
    assert check["status"] == "done"
    assert "skipped" in check["phases"]["alone, stops at end of turn (model_card_generate)"]
    assert "skipped" in (tmp_path / "check.md").read_text()
    assert len(list(tmp_path.iterdir())) <= 8  # a device run brings back at most 8 files


def test_the_script_skips_what_its_budget_cannot_hold(tmp_path):
    done = run_script(tmp_path, PHASES="check speed", BUDGET="10")
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "report.md").read_text()
    assert "- check: skipped" in report and "- speed: skipped" in report
