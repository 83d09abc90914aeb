"""The `choices` input: candidate answers to a closed question, checked as a stranger's text, and each candidate's
tokens as the model would write it after the prompt: `Assistant: yes<end_of_utterance>` for `yes`."""

import json

from idefics_cog.errors import InputError, shorten
from idefics_cog.inputs.messages import USER_TEXT_TOKENS
from idefics_cog.inputs.prompt import END_OF_UTTERANCE, Segment, as_plain_text, tokenize

FORMAT = 'a JSON list of strings (["yes", "no"]) or comma-separated (yes,no)'
# A JSON escape is at most 6 characters per character (\u00e9), plus quotes and separators.
JSON_CHARS_PER_CHAR = 6


def parse_choices(value: str, count: int, longest: int) -> list[str]:
    """The candidates, stripped; [] when none are given. `count`, `longest`: IDEFICS_MAX_CHOICES and
    IDEFICS_MAX_CHOICE_CHARS. The size is checked before parsing."""
    value = value.strip()
    if not value:
        return []
    if len(value) > count * (JSON_CHARS_PER_CHAR * longest + 4) + 2:
        raise InputError(f"choices: {len(value)} characters; the limit is {count} candidates of at most {longest} "
                         f"characters (IDEFICS_MAX_CHOICES, IDEFICS_MAX_CHOICE_CHARS)")
    return check_candidates(_json_list(value) if value.startswith("[") else value.split(","), count, longest)


def check_candidates(items: list, count: int, longest: int) -> list[str]:
    """Candidates stripped; refused (InputError naming `choices`): not strings, empty, too many or too long, the
    same one twice, fewer than 2."""
    if len(items) > count:
        raise InputError(f"choices: {len(items)} candidates; the limit is {count} (IDEFICS_MAX_CHOICES)")
    candidates = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, str):
            raise InputError(f"choices: item {number} is {type(item).__name__}, not a string; the format is {FORMAT}")
        text = item.strip()
        if not text:
            raise InputError(f"choices: item {number} is empty")
        if len(text) > longest:
            raise InputError(f"choices: item {number} ({shorten(repr(text), 40)}) is {len(text)} characters; the "
                             f"limit is {longest} (IDEFICS_MAX_CHOICE_CHARS)")
        if text in candidates:
            raise InputError(f"choices: {shorten(repr(text), 40)} is given twice (items {candidates.index(text) + 1} "
                             f"and {number})")
        candidates.append(text)
    if len(candidates) < 2:
        raise InputError("choices: give at least 2 candidates (one would have probability 1)")
    return candidates


def _json_list(value: str) -> list:
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):  # JSONDecodeError, a nesting too deep, an integer too long
        raise InputError(f"choices: not valid JSON; the format is {FORMAT}") from None
    if not isinstance(parsed, list):
        raise InputError(f"choices: must be a list; the format is {FORMAT}")
    return parsed


def answered(segments: list[Segment], candidate: str) -> list[Segment]:
    """The prompt with `candidate` as the assistant's whole answer, after a space, closed by <end_of_utterance>.
    Typed control tokens stay text, as in a prompt."""
    text = f" {as_plain_text(candidate, USER_TEXT_TOKENS)}{END_OF_UTTERANCE}"
    if segments and isinstance(segments[-1], str):
        return [*segments[:-1], segments[-1].rstrip(" ") + text]
    return [*segments, text]


def candidate_ids(segments: list[Segment], candidates: list[str], prompt_ids: list[int], tokenizer
                  ) -> list[list[int]]:
    """Each candidate's tokens after the prompt's, its <end_of_utterance> last: the tokens of the whole transcript
    past the prompt's. Raises InputError for a candidate that would change how the prompt's end is tokenized."""
    result = []
    for number, candidate in enumerate(candidates, 1):
        ids = tokenize(answered(segments, candidate), tokenizer)
        if ids[:len(prompt_ids)] != prompt_ids:
            raise InputError(f"choices: item {number} ({shorten(repr(candidate), 40)}) merges with the end of the "
                             f"prompt into other tokens; end the prompt where the answer starts")
        result.append(ids[len(prompt_ids):])
    return result
