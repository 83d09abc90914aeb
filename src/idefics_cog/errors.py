"""The error types more than one part raises or catches. Each message names the input or the source, and the limit."""

import re
from pathlib import Path


class InputError(ValueError):
    """A request the model cannot serve as given; the message names the input and the limit."""


def reason(exc: Exception, path) -> str:
    """A library's error text without the file's path or name: Cog hands predict a temporary file
    (`tmpb7b1i4aofile.png`) whose name tells the user nothing; the message names the input instead."""
    text = str(exc)
    for shown in (str(path), Path(path).name):
        text = re.sub(rf"\s*['\"]?{re.escape(shown)}['\"]?", "", text)
    return text.strip() or type(exc).__name__


def shorten(text: str, limit: int = 100) -> str:
    """`text` as a message may echo it: whole up to `limit` characters, else its start and its last 30 characters
    (a URL's file name) around "...", never a stranger's whole string, which could be megabytes."""
    text = str(text)
    tail = min(30, limit // 3)
    return text if len(text) <= limit else f"{text[:limit - tail]}...{text[len(text) - tail:]}"


class WeightsError(RuntimeError):
    """A weight source that cannot be used; the message names the source."""


class UnreachableError(WeightsError):
    """Weights in no cache, from a hub that cannot be used now (offline, unreachable): another source would do."""


class AdapterError(ValueError):
    """An adapter that does not fit the base model or is not in the standard PEFT layout."""
