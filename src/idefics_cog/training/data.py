"""Datasets for training and evaluation: a zip or tar holding `data.jsonl` (one example a line: `images` and either
`question`/`answer` or a `conversation` of user/assistant turns) and its images."""

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from idefics_cog.errors import InputError, WeightsError
from idefics_cog.inputs.images import load_image
from idefics_cog.inputs.prompt import END_OF_UTTERANCE, Segment, build_segments, render
from idefics_cog.weights.safe_extract import extract_archive

DATA_FILE = "data.jsonl"


class DatasetError(InputError):
    """The message names the file and line."""


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str


@dataclass(frozen=True)
class Example:
    images: tuple[Path, ...]
    turns: tuple[Turn, ...]
    line: int  # in data.jsonl, for error messages

    def load_images(self) -> list[Image.Image]:
        return [load_image(f"{DATA_FILE} line {self.line}: {path.name}", path) for path in self.images]

    def transcript(self, answer_last: bool = True) -> tuple[list[Segment], list[tuple[int, int]]]:
        """Instruct-format segments and the spans in `render(segments)` of the answers with their
        `<end_of_utterance>`: all that training learns. `answer_last=False`: the prompt for evaluation."""
        segments = build_segments(self.turns[0].user, len(self.images), "instruct")  # ends with "\nAssistant:"
        spans = []
        for index, turn in enumerate(self.turns):
            if index:
                segments.append(f"\nUser: {turn.user}{END_OF_UTTERANCE}\nAssistant:")
            if index == len(self.turns) - 1 and not answer_last:
                break
            opening = segments.pop()  # the answer shares its text item, so the space after "Assistant:" stays
            start = len(render(segments)) + len(opening) + 1
            segments.append(f"{opening} {turn.assistant}{END_OF_UTTERANCE}")
            spans.append((start, len(render(segments))))
        return segments, spans


def load_dataset(archive: Path, workdir: Path) -> list[Example]:
    """Extracted safely into `workdir`, which the caller removes."""
    if not Path(archive).is_file():
        raise DatasetError(f"dataset: {archive} is not a file")
    root = Path(workdir)
    try:
        extract_archive(Path(archive), root, "dataset")
    except WeightsError as exc:
        raise DatasetError(str(exc)) from None
    candidates = [root / DATA_FILE, *root.glob(f"*/{DATA_FILE}")]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise DatasetError(f"dataset: no {DATA_FILE} at the root of the archive")
    return read_jsonl(found)


def read_jsonl(path: Path) -> list[Example]:
    examples = []
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if raw.strip():
            examples.append(_parse(raw, number, path.parent))
    if not examples:
        raise DatasetError(f"{DATA_FILE}: no examples")
    return examples


def _parse(raw: str, line: int, root: Path) -> Example:
    where = f"{DATA_FILE} line {line}"
    try:
        item = json.loads(raw)
    except ValueError as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: expected a JSON object")
    if "conversation" in item:
        turns = item["conversation"]
        if not isinstance(turns, list) or not turns or not all(
                isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str)
                for t in turns):
            raise DatasetError(f"{where}: conversation must be a non-empty list of {{\"user\", \"assistant\"}} texts")
        parsed = tuple(Turn(t["user"], t["assistant"]) for t in turns)
    elif isinstance(item.get("question"), str) and isinstance(item.get("answer"), str):
        parsed = (Turn(item["question"], item["answer"]),)
    else:
        raise DatasetError(f"{where}: needs \"question\" and \"answer\" texts, or a \"conversation\"")
    names = item.get("images", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DatasetError(f"{where}: images must be a list of paths")
    images = []
    for name in names:
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise DatasetError(f"{where}: image path {name!r} must stay inside the archive")
        if not (root / relative).is_file():
            raise DatasetError(f"{where}: image {name!r} is not in the archive")
        images.append(root / relative)
    try:
        build_segments(parsed[0].user, len(images), "instruct")
    except InputError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    return Example(tuple(images), parsed, line)
