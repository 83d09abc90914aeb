"""The answers of a run, one JSON line per (configuration, question), appended and flushed as each arrives: a run
that stops (killed, interrupted, a replica gone) resumes from the same file, asking only what is missing."""

import json
import threading
from dataclasses import asdict
from pathlib import Path

from idefics_cog.errors import InputError


class Journal:
    """`path` None keeps the records in memory only. `settings` (max_new_tokens, the yes/no candidates) are part of
    each record's key: answers asked under other settings are not reused, they are asked again."""

    def __init__(self, path: Path | None = None, settings: dict | None = None):
        self.path = Path(path) if path else None
        self.settings = settings or {}
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._file = None
        if self.path is None:
            return
        if self.path.exists():
            self._read()
        self._file = open(self.path, "a", encoding="utf-8")

    def _read(self) -> None:
        text = self.path.read_text(encoding="utf-8")
        if text and not text.endswith("\n"):  # a line cut short by a kill: dropped, that answer is asked again
            text = text[:text.rfind("\n") + 1]
            self.path.write_text(text, encoding="utf-8")
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                record = json.loads(line)
                self.records[record["key"]] = record
            except (ValueError, KeyError, TypeError):
                raise InputError(f"results: {self.path} line {number} is not a record of `evaluate`; "
                                 f"name a new file") from None

    def key(self, configuration, index: int) -> str:
        return json.dumps([asdict(configuration), index, self.settings], sort_keys=True)

    def done(self, configuration, index: int, question: str) -> dict | None:
        """The record already there, checked to be the same question (not a file from another dataset)."""
        record = self.records.get(self.key(configuration, index))
        if record is not None and record["question"] != question:
            raise InputError(f"results: {self.path} holds another question at question {index + 1} "
                             f"({record['question'][:60]!r}): it was written for another dataset; name a new file")
        return record

    def answered(self, configuration, index: int, question: str) -> bool:
        """Whether the question has its answer: one that failed (a replica gone, out of memory, a refusal) is asked
        again by the next run; its new record, appended, is the one read."""
        record = self.done(configuration, index, question)
        return record is not None and not record.get("error") and not record.get("choice_error")

    def add(self, configuration, index: int, record: dict) -> dict:
        record = {"key": self.key(configuration, index), **record}
        with self._lock:
            self.records[record["key"]] = record
            if self._file is not None:
                self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
                self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "Journal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
