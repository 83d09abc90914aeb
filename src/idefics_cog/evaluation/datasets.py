"""What `evaluate` reads: the training archive (a .zip/.tar holding data.jsonl, training/data.py), or parquet in the
layout the medical VQA sets are published in on the Hugging Face hub (PathVQA, VQA-RAD: columns `image`, a struct
{bytes, path}, `question` and `answer`), as one .parquet file or a folder of them (read recursively, in name order).

Either may give each question its own candidate answers (a `choices` list: a data.jsonl key, or a parquet column
`choices` or `options`); a question without them whose reference is yes or no gets the yes/no candidates."""

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from idefics_cog.config import RequestLimits
from idefics_cog.errors import InputError
from idefics_cog.inputs.choices import check_candidates
from idefics_cog.evaluation.metrics import closed_answer
from idefics_cog.inputs.images import load_image
from idefics_cog.training.data import DATA_FILE, DatasetError, Example, Turn, load_dataset

COLUMNS = ("image", "question", "answer")
OPTION_COLUMNS = ("choices", "options")
BATCH_ROWS = 64  # rows decoded at a time: images stay on disk, not all in memory


@dataclass(frozen=True)
class ParquetExample(Example):
    """An example read from a parquet row; messages name the file and row, not data.jsonl."""

    where: str = ""

    def load_images(self) -> list[Image.Image]:
        return [load_image(f"{self.where}: image", path) for path in self.images]


@dataclass(frozen=True)
class Item:
    """One question to ask: the example, where it comes from (for messages and the review sheet), and the dataset's
    own candidate answers, if it gives any."""

    example: Example
    where: str
    options: tuple[str, ...] = ()

    @property
    def question(self) -> str:
        return self.example.turns[-1].user

    @property
    def reference(self) -> str:
        return self.example.turns[-1].assistant

    def choices(self, closed: tuple[str, ...]) -> tuple[str, ...]:
        """The candidates to score: the dataset's options, else `closed` for a yes/no question, else none."""
        if not closed:  # --choices none
            return ()
        return self.options or (closed if closed_answer(self.reference) is not None else ())


def is_parquet(path: Path) -> bool:
    return Path(path).is_dir() or Path(path).suffix.lower() == ".parquet"


def load(path: Path, workdir: Path, limit: int | None = None) -> list[Item]:
    """The first `limit` questions (all when None). Images are written under `workdir`, which the caller removes."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"dataset: {path} does not exist")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    items = _read_parquet(path, Path(workdir), limit) if is_parquet(path) else _read_archive(path, Path(workdir))
    if not items:
        raise DatasetError(f"dataset: {path} holds no questions")
    return items[:limit]


def _read_archive(path: Path, workdir: Path) -> list[Item]:
    examples = load_dataset(path, workdir)
    # training/data.py ignores keys it does not use: read `choices` from the same data.jsonl it found.
    data = next(p for p in (workdir / DATA_FILE, *workdir.glob(f"*/{DATA_FILE}")) if p.is_file())
    lines = data.read_text(encoding="utf-8").splitlines()
    items = []
    for example in examples:
        where = f"{DATA_FILE} line {example.line}"
        options = json.loads(lines[example.line - 1]).get("choices", [])
        items.append(Item(example, where, _options(options, where)))
    return items


def _options(value, where: str) -> tuple[str, ...]:
    if value is None or value == []:  # no candidates of its own
        return ()
    if not isinstance(value, list):
        raise DatasetError(f"{where}: choices must be a list of texts, got {value!r}")
    limits = RequestLimits()  # as a server with the default limits takes them: both paths score the same
    try:
        return tuple(check_candidates(value, limits.choices, limits.choice_chars))
    except InputError as exc:
        raise DatasetError(f"{where}: {exc}") from None


def parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if not files:
        raise DatasetError(f"dataset: no .parquet files in the folder {path}")
    return files


def _read_parquet(path: Path, workdir: Path, limit: int | None) -> list[Item]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    items: list[Item] = []
    for file in parquet_files(path):
        try:
            table = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as exc:
            raise DatasetError(f"dataset: {file.name} is not a readable parquet file ({exc})") from None
        names = table.schema_arrow.names
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise DatasetError(f"dataset: {file.name} has no column {', '.join(missing)} (it needs "
                               f"{', '.join(COLUMNS)}; it has {', '.join(names)})")
        options = next((c for c in OPTION_COLUMNS if c in names), None)
        row = 0
        for batch in table.iter_batches(batch_size=BATCH_ROWS, columns=[*COLUMNS, *([options] if options else [])]):
            for record in batch.to_pylist():
                row += 1
                if limit is not None and len(items) >= limit:
                    return items
                items.append(_parquet_item(record, file, row, workdir / f"{len(items):06d}", options))
    return items


def _parquet_item(record: dict, file: Path, row: int, stem: Path, options: str | None) -> Item:
    where = f"{file.name} row {row}"
    question, answer = record["question"], record["answer"]
    if not isinstance(question, str) or not isinstance(answer, str):
        raise DatasetError(f"{where}: question and answer must be texts")
    image = _image_file(record["image"], file, where, stem)
    turns = (Turn(question, answer),)
    try:
        example = ParquetExample((image,) if image else (), turns, row, where)
        example.transcript(answer_last=False)  # `<image>` placeholders checked now, not mid-run
    except InputError as exc:
        raise DatasetError(f"{where}: {exc}") from None
    return Item(example, where, _options(record.get(options) if options else None, where))


def _image_file(value, file: Path, where: str, stem: Path) -> Path | None:
    """The hub's image struct {bytes, path} (or bare bytes) as a file; without bytes, `path` is read relative to
    the parquet file's folder."""
    if value is None:
        return None
    data, name = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (value, None)
    if data is not None:
        if not isinstance(data, bytes):
            raise DatasetError(f"{where}: image bytes must be binary, got {type(data).__name__}")
        target = stem.with_suffix(Path(name or "").suffix.lower() or ".img")
        target.write_bytes(data)
        return target
    if not name:
        raise DatasetError(f"{where}: the image has neither bytes nor a path")
    folder = file.parent.resolve()
    target = (folder / name).resolve()
    if Path(name).is_absolute() or not target.is_relative_to(folder):  # a stranger's file names no file of ours
        raise DatasetError(f"{where}: image path {name!r} is outside the parquet file's folder {folder}")
    if not target.is_file():
        raise DatasetError(f"{where}: image path {name!r} is not a file (relative to {file.parent})")
    return target
