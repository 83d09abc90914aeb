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


class WeightsError(RuntimeError):
    """A weight source that cannot be used; the message names the source."""


class UnreachableError(WeightsError):
    """Weights in no cache, from a hub that cannot be used now (offline, unreachable): another source would do."""


class AdapterError(ValueError):
    """An adapter that does not fit the base model or is not in the standard PEFT layout."""
