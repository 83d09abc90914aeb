"""The side-by-side table of metrics: one column per configuration, and the difference when there are two."""

# (title, key in metrics.aggregate): a closed question is scored twice, by the generated answer's yes/no and by the
# most probable candidate (`choices`): a verbose answer ("The image shows no evidence of ...") can be right while
# its first yes/no word is missing or misleading, which string matching alone hides.
ROWS = [("closed accuracy (yes/no)", "closed_accuracy"), ("closed accuracy (choices)", "choice_accuracy"),
        ("open recall", "open_recall"), ("token F1", "f1"), ("exact match", "exact_match"), ("BLEU-4", "bleu")]


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def labels(results: list[dict]) -> list[str]:
    """Each configuration's label, numbered when two are the same."""
    names = [r["label"] for r in results]
    if len(set(names)) < len(names):
        return [f"{name} ({index})" for index, name in enumerate(names, start=1)]
    return names


def table(results: list[dict]) -> list[list[str]]:
    """The header, then the rows, as cells."""
    compare = len(results) == 2
    rows = [["metric (%)", *labels(results)] + (["difference"] if compare else [])]
    for title, key in ROWS:
        values = [r["metrics"][key] for r in results]
        cells = [title, *map(percent, values)]
        if compare:
            a, b = values
            cells.append("n/a" if a is None or b is None else f"{100 * (b - a):+.1f}")
        rows.append(cells)
    metrics = results[0]["metrics"]
    counts = f"{metrics['questions']} ({metrics['closed']} closed, {metrics['open']} open)"
    rows.append(["questions", *[counts] * len(results)] + ([""] if compare else []))
    chosen = [str(r["metrics"]["chosen"]) for r in results]
    if any(c != "0" for c in chosen):
        rows.append(["scored by choices", *chosen] + ([""] if compare else []))
    for title, key in (("errors (scored as empty)", "errors"), ("choice errors (scored as wrong)", "choice_errors")):
        errors = [r["metrics"].get(key, 0) for r in results]
        if any(errors):
            rows.append([title, *map(str, errors)] + ([""] if compare else []))
    return rows


def markdown_table(results: list[dict]) -> str:
    """Metric rows in %, one column per configuration, and the difference in points."""
    header, *rows = table(results)
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"
