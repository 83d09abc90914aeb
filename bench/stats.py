"""The tables every benchmark prints: medians, the best sample, and each median against a baseline from the same run."""

import statistics


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
