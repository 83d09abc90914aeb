"""The tables every benchmark prints: medians, the best sample, and each median against a baseline from the same run."""

import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import transformers


def median_table(title: str, ms: dict[str, list[float]], baseline: str) -> str:
    """Durations in ms (lower is better): median, minimum, median / the baseline's median."""
    return _table(title, ms, baseline, "ms", "min", min)


def rate_table(title: str, rates: dict[str, list[float]], baseline: str, unit: str = "tokens/s") -> str:
    """Rates (higher is better): median, maximum, median / the baseline's median."""
    return _table(title, rates, baseline, unit, "max", max)


def _table(title: str, samples: dict[str, list[float]], baseline: str, unit: str, best_name: str, best) -> str:
    base = statistics.median(samples[baseline])
    lines = [f"| {title} | median {unit} | {best_name} {unit} | median / {baseline} |", "|---|---:|---:|---:|"]
    for name, values in samples.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.1f} | {best(values):.1f} | {median / base:.2f}x |")
    return "\n".join(lines)


def machine() -> dict:
    """The machine a benchmark ran on, for its report."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    return dict(cpu=model, cpus=len(os.sched_getaffinity(0)), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version())


def report_and_exit(title: str, report: dict, json_path: Path | None, digits: int = 1) -> None:
    """Print a report of one value per line as a table (and write it as JSON); exit 0 if its "ok" is true."""
    print(f"| {title} | value |\n|---|---:|")
    for key, value in report.items():
        print(f"| {key} | {value:.{digits}f} |" if isinstance(value, float) else f"| {key} | {value} |")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, default=str))
    sys.exit(0 if report["ok"] else 1)
