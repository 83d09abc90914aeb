"""Error types more than one part raises or catches; messages name the input or source, and the limit."""

import re
from pathlib import Path


class InputError(ValueError):
    """A request the model cannot serve as given."""


def reason(exc: Exception, path) -> str:
    """A library's error text without Cog's temporary file name (`tmpb7b1i4aofile.png`)."""
    text = str(exc)
    for shown in (str(path), Path(path).name):
        text = re.sub(rf"\s*['\"]?{re.escape(shown)}['\"]?", "", text)
    return text.strip() or type(exc).__name__


def shorten(text: str, limit: int = 100) -> str:
    """Never echo a stranger's whole string: its start and last characters (a URL's file name) around "..."."""
    text = str(text)
    tail = min(30, limit // 3)
    return text if len(text) <= limit else f"{text[:limit - tail]}...{text[len(text) - tail:]}"


class WeightsError(RuntimeError):
    """The message names the source."""


class UnreachableError(WeightsError):
    """A hub that cannot be reached now, and the weights are not downloaded yet: another source would do."""


class AdapterError(ValueError):
    """Not in the standard PEFT layout, or not fitting the base model."""
