"""`output_format=json`: a prediction's result as one JSON document (its schema: docs/inputs.md, "The JSON result")."""

import json

from idefics_cog.serving.jobs import Job
from idefics_cog.serving.scoring import best, choice_table

OUTPUT_FORMATS = ("text", "json")


def chosen(texts: list[str], job: Job) -> tuple[str, list[dict]]:
    """The most probable candidate and the table of all of them."""
    table = choice_table(texts, job.scores)
    return best(table), table


def document(job: Job, text: str, tokenizer, choices: list[dict] | None = None) -> str:
    """The text, why it ended, the token counts, and the choices table or the generated tokens' log-probabilities
    when asked."""
    stats = job.stats
    result = {"text": text, "finish_reason": "choice" if choices is not None else stats.finish_reason,
              "usage": {"prompt_tokens": stats.prompt_tokens, "completion_tokens": len(stats.ids)}}
    if choices is not None:
        result["choices"] = choices
    if job.logprobs:
        # The tokens the answer took (a stop sequence's step may have produced one more).
        result["logprobs"] = [_token(tokenizer, report) for report in job.token_logprobs[:len(stats.ids)]]
    return json.dumps(result, ensure_ascii=False)


def _token(tokenizer, report: dict) -> dict:
    """Tokens by their vocabulary piece ("▁" marks a space before the word, <0x..> a byte)."""
    return {"token": tokenizer.piece(report["id"]), "id": report["id"], "logprob": report["logprob"],
            "top": [{"token": tokenizer.piece(i), "id": i, "logprob": value} for i, value in report["top"]]}
