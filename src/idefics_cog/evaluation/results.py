"""From the answers to the scored results: each record gets its scores (the answer's, and its most probable choice's),
each configuration its metrics. Scores are computed here, from the raw answers, never read back from a results file,
so a resumed run is scored by the code that runs now."""

from dataclasses import asdict

from tqdm import tqdm

from idefics_cog.evaluation.datasets import Item
from idefics_cog.evaluation.metrics import aggregate, choice_score, score


def question(item: Item, index: int) -> dict:
    """What a record says about its question."""
    return {"index": index, "where": item.where, "line": item.example.line, "question": item.question,
            "reference": item.reference}


def scored(record: dict) -> dict:
    out = {k: v for k, v in record.items() if k != "key"}
    out.update(score(out.get("prediction", ""), out["reference"]))
    if out.get("choices"):
        out.update(choice_score(out["choices"], out["reference"]))
    return out


def collect(items: list[Item], configurations, journal, extra: dict | None = None) -> list[dict]:
    """One result per configuration: its metrics and its scored records, in the dataset's order."""
    results = []
    for config in configurations:
        records = [scored(journal.done(config, index, item.question)) for index, item in enumerate(items)]
        results.append({"label": config.label, **asdict(config), **(extra or {}).get(config, {}),
                        "metrics": aggregate(records), "predictions": records})
    return results


def progress(total: int, done: int, what: str) -> tqdm:
    """A progress bar on stderr, shown on a terminal only (log files get the summary lines)."""
    return tqdm(total=total, initial=done, desc=what, unit="answer", disable=None, dynamic_ncols=True)
