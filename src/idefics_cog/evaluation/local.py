"""Evaluation in this process: the model loaded here, each question asked through a prediction's code path (the
engine's greedy stream, and `choose` for the candidate answers), one configuration after the other."""

import logging

from idefics_cog.errors import InputError
from idefics_cog.evaluation.configuration import Configuration
from idefics_cog.evaluation.datasets import Item
from idefics_cog.evaluation.journal import Journal
from idefics_cog.evaluation.results import collect, progress, question

log = logging.getLogger(__name__)


def select(adapters, config: Configuration) -> str:
    """Unlike a request, the operator may name a local directory as `lora_weights`."""
    return adapters.engine.run(adapters.select, config.adapter, config.lora_weights, config.lora_scale, True)


def answer(engine, item: Item, max_new_tokens: int, choices: tuple[str, ...]) -> dict:
    """The greedy answer and, when there are candidates, their table (`choices`). An input the model cannot take
    (e.g. a prompt over the context) is recorded as the error and scored as an empty answer."""
    from idefics_cog.serving.jobs import Sampling

    record = {"prediction": ""}
    segments, _ = item.example.transcript(answer_last=False)  # ends with "\nAssistant:"
    try:
        images = item.example.load_images()
        encoded = engine.encode(segments, images)
        record["prediction"] = "".join(engine.stream(encoded, Sampling(max_new_tokens=max_new_tokens, seed=0))).strip()
    except InputError as exc:
        record["error"] = str(exc)
        return record
    if choices:
        try:
            record["choices"] = engine.choose(segments, images, list(choices))
        except InputError as exc:
            record["choice_error"] = str(exc)
    return record


def evaluate(engine, adapters, items: list[Item], configurations: list[Configuration], max_new_tokens: int,
             closed_choices: tuple[str, ...] = ("yes", "no"), journal: Journal | None = None) -> list[dict]:
    journal = journal or Journal()
    active = {}
    for config in configurations:
        todo = [(i, item) for i, item in enumerate(items) if not journal.answered(config, i, item.question)]
        active[config] = {"active": select(adapters, config)}
        log.info("configuration %s: adapter in use %s; %d of %d questions to ask", config.label,
                 active[config]["active"], len(todo), len(items))
        with progress(len(items), len(items) - len(todo), config.label) as bar:
            for index, item in todo:
                record = answer(engine, item, max_new_tokens, item.choices(closed_choices))
                for problem in ("error", "choice_error"):
                    if record.get(problem):
                        log.warning("%s: %s: %s", config.label, item.where, record[problem])
                journal.add(config, index, {**question(item, index), **record})
                bar.update()
    return collect(items, configurations, journal, active)
