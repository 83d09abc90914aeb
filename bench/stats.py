"""The one table every benchmark prints: medians, minima, and each median against a baseline from the same run."""

import statistics


def median_table(title: str, ms: dict[str, list[float]], baseline: str) -> str:
    base = statistics.median(ms[baseline])
    lines = [f"| {title} | median ms | min ms | median / {baseline} |", "|---|---:|---:|---:|"]
    for name, samples in ms.items():
        median = statistics.median(samples)
        lines.append(f"| {name} | {median:.1f} | {min(samples):.1f} | {median / base:.2f}x |")
    return "\n".join(lines)
