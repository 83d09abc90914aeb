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
