"""The `messages` input: a conversation as the JSON list chat clients send (`[{"role": ..., "content": ...}]`),
checked as a stranger's text and rendered to the IDEFICS-instruct turns: the segments `build_segments` makes of the
equivalent `raw` transcript. `{"type": "image"}` takes the request's next file; `image_url` parts take data: URLs
only, decoded later (`load_data_image`) under the image limits of a file. Text never makes the server fetch."""

import base64
import binascii
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote_to_bytes

from PIL import Image

from idefics_cog.config import ImageLimits
from idefics_cog.errors import InputError, shorten
from idefics_cog.inputs.images import Reduction, check_count, load_image
from idefics_cog.inputs.prompt import CONTROL_TOKENS, END_OF_UTTERANCE, IMAGE_TOKEN, Segment, as_plain_text

MAX_MESSAGES = 200
ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "image", "image_url")
PART_KEYS = {"text": {"type", "text"}, "image": {"type"}, "image_url": {"type", "image_url"}}
IMAGE_URL_KEYS = {"url", "detail"}  # `detail` (OpenAI's) is accepted and has no effect
USER_TEXT_TOKENS = (*CONTROL_TOKENS, IMAGE_TOKEN)  # typed in text, all of them stay text
FORMAT = '[{"role": "system" | "user" | "assistant", "content": "..." or a list of parts}]'
_DATA_START = re.compile(r'"data:', re.IGNORECASE)


@dataclass(frozen=True)
class DataImage:
    """An image_url part's data: URL, decoded when the request's images are read (off the event loop)."""

    name: str  # "messages: item 2, part 3", the name its errors give
    url: str


@dataclass
class Conversation:
    """`segments` as `build_segments` makes them; segment image `i` is `images[i]`: an int is the index of a file
    input (`image`, then `images`), a DataImage a decoded data: URL."""

    segments: list[Segment]
    images: list["int | DataImage"]


def read_messages(text: str, num_files: int, max_images: int, max_chars: int) -> Conversation:
    """`text`: the JSON; `num_files`: the request's image files; `max_chars`: IDEFICS_MAX_PROMPT_CHARS, the most
    characters of the JSON less its data: URLs, and of all its text. Raises InputError naming the input."""
    outside_data = len(text) - data_string_chars(text)
    if outside_data > max_chars:
        raise InputError(f"messages: {outside_data} characters (not counting data: URLs); the limit is {max_chars} "
                         f"(IDEFICS_MAX_PROMPT_CHARS)")
    try:
        parsed = json.loads(text)
    except RecursionError:
        raise InputError("messages: not valid JSON (nested too deeply)") from None
    except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
        raise InputError(f"messages: not valid JSON ({shorten(exc)}); the format is {FORMAT}") from None
    if not isinstance(parsed, list):
        raise InputError(f"messages: must be a JSON list, got {_kind(parsed)}; the format is {FORMAT}")
    if not parsed:
        raise InputError("messages: the list is empty; it needs at least one user message")
    if len(parsed) > MAX_MESSAGES:
        raise InputError(f"messages: {len(parsed)} messages; the limit is {MAX_MESSAGES}")

    system, turns, images, chars = "", [], [], 0
    files = 0  # {"type": "image"} parts met so far
    for number, message in enumerate(parsed, 1):
        where = f"messages: item {number}"
        role, content = _message(message, where)
        if role == "system":
            if number != 1:
                raise InputError(f"{where}: a system message must come first, and there can be only one")
        else:
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise InputError(f"{where}: expected {'a user' if expected == 'user' else 'an assistant'} message, "
                                 f"got {role} (after the optional system message, user and assistant messages "
                                 f"alternate, starting with user)")
        parts: list[Segment] = []
        for index, part in enumerate(content, 1):
            name = f"{where}, part {index}" if isinstance(content, list) else where
            kind, value = _part(part, name)
            if kind == "text":
                chars += len(value)
                if chars > max_chars:  # text that starts with data: was not counted before parsing
                    raise InputError(f"messages: more than {max_chars} characters of text (by {name}); the limit "
                                     f"is {max_chars} (IDEFICS_MAX_PROMPT_CHARS)")
                parts.append(as_plain_text(value, USER_TEXT_TOKENS))
                continue
            if role != "user":
                raise InputError(f"{name}: images go in user messages only, not in {role} messages")
            if kind == "image":
                images.append(files)
                files += 1
            else:
                images.append(DataImage(name, value))
            parts.append(len(images) - 1)
        if role == "system":
            system = "".join(parts)  # text only: images were refused above
        else:
            turns.append((role, _merged(parts)))
    if not turns or turns[-1][0] != "user":
        raise InputError("messages: the conversation must end with a user message (the model answers it)")
    if files != num_files:
        raise InputError(f'messages: {files} {{"type": "image"}} part(s) but {num_files} image file(s) were given '
                         f'(image, then images); each {{"type": "image"}} part takes the next file')
    check_count(len(images), max_images, "image, images, messages")
    return Conversation(_segments(system, turns), images)


def data_string_chars(text: str) -> int:
    """Characters of the JSON strings that start with `data:`, quotes included: counted before parsing, with
    str.find (a regular expression over a 60 MB data: URL takes most of a second). A quote after 64 or more
    backslashes counts as a string's end: a region counted is never longer than the string JSON reads."""
    total, position = 0, 0
    while found := _DATA_START.search(text, position):
        end = found.end()
        while (end := text.find('"', end)) != -1:
            before = text[max(end - 64, 0):end]
            if (len(before) - len(before.rstrip("\\"))) % 2 == 0:  # not an escaped quote
                break
            end += 1
        if end == -1:
            return total
        total += end + 1 - found.start()
        position = end + 1
    return total


def _message(message, where: str) -> tuple[str, list | tuple]:
    """(role, content parts); a string content is one text part."""
    if not isinstance(message, dict):
        raise InputError(f'{where}: must be an object {{"role": ..., "content": ...}}, got {_kind(message)}')
    unknown = sorted(set(message) - {"role", "content"})
    if unknown:
        raise InputError(f"{where}: unknown key {shorten(repr(unknown[0]), 60)}; a message has role and content")
    role = message.get("role")
    if role not in ROLES:  # also a number, a list, a missing role
        shown = shorten(repr(role), 60) if isinstance(role, str) else _kind(role)
        raise InputError(f"{where}: role must be system, user or assistant, got {shown}")
    if "content" not in message:
        raise InputError(f"{where}: content is missing")
    content = message["content"]
    if isinstance(content, str):
        return role, ({"type": "text", "text": content},)
    if not isinstance(content, list):
        raise InputError(f"{where}: content must be a string or a list of parts, got {_kind(content)}")
    return role, content


def _part(part, name: str) -> tuple[str, str]:
    """("text", the text), ("image", "") or ("image_url", the data: URL)."""
    if not isinstance(part, dict):
        raise InputError(f'{name}: a part must be an object with a "type", got {_kind(part)}')
    kind = part.get("type")
    if kind not in PART_TYPES:
        shown = shorten(repr(kind), 60) if isinstance(kind, str) else _kind(kind)
        raise InputError(f"{name}: unknown part type {shown}; the types are text, image and image_url")
    unknown = sorted(set(part) - PART_KEYS[kind])
    if unknown:
        raise InputError(f"{name}: unknown key {shorten(repr(unknown[0]), 60)} in a part of type {kind} (it takes "
                         f"{' and '.join(sorted(PART_KEYS[kind]))})")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise InputError(f"{name}: text must be a string, got {_kind(part.get('text'))}")
        try:
            part["text"].encode("utf-8")  # JSON's "\ud800" makes a lone surrogate, which no tokenizer takes
        except UnicodeEncodeError:
            raise InputError(f"{name}: text is not valid Unicode (a lone surrogate)") from None
        return kind, part["text"]
    if kind == "image":
        return kind, ""
    image_url = part.get("image_url")
    if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
        raise InputError(f'{name}: image_url must be an object {{"url": "data:..."}}, got {_kind(image_url)}')
    unknown = sorted(set(image_url) - IMAGE_URL_KEYS)
    if unknown:
        raise InputError(f"{name}: unknown key {shorten(repr(unknown[0]), 60)} in image_url (it takes url)")
    url = image_url["url"]
    if url[:5].lower() != "data:":
        raise InputError(f"{name}: image_url parts take only data: URLs; send {shorten(url, 60)} as a file input "
                         f"(image or images)")
    return kind, url


def _kind(value) -> str:
    """A JSON value's type, never the value itself."""
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _merged(parts: list[Segment]) -> list[Segment]:
    """Adjacent texts joined (a message's text parts follow each other with nothing between), empty ones dropped."""
    merged: list[Segment] = []
    for part in parts:
        if isinstance(part, str) and merged and isinstance(merged[-1], str):
            merged[-1] += part
        else:
            merged.append(part)
    return [part for part in merged if part != ""]


def _segments(system: str, turns: list[tuple[str, list[Segment]]]) -> list[Segment]:
    """`User: {text}`, images in place, `<end_of_utterance>`; `\\nAssistant: {text}<end_of_utterance>`; turns after
    the first start on a new line; `\\nAssistant:` is left open. The system text as `system_prompt` is placed."""
    pieces: list[Segment] = []
    for number, (role, parts) in enumerate(turns):
        prefix = ("" if number == 0 else "\n") + ("User:" if role == "user" else "Assistant:")
        if parts and isinstance(parts[0], str):
            pieces += [f"{prefix} {parts[0]}", *parts[1:]]
        else:
            pieces += [prefix, *parts]
        pieces.append(END_OF_UTTERANCE)
    segments = _merged([*pieces, "\nAssistant:"])
    if system:
        segments = [system.rstrip() + "\n", *segments]
    return segments


def decode_data_url(name: str, url: str) -> bytes:
    """`data:[<media type>][;base64],<data>` to its bytes."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise InputError(f"{name}: not a valid data: URL (no comma before the data)")
    base64_encoded = header.lower().endswith(";base64")
    try:
        return base64.b64decode(payload) if base64_encoded else unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:  # ValueError: characters outside ASCII, a lone surrogate
        kind = "base64" if base64_encoded else "percent-encoding"
        raise InputError(f"{name}: not a valid data: URL ({kind}: {shorten(exc, 80)})") from None


def load_data_image(image: DataImage, limits: ImageLimits, reduce: Reduction | None = None) -> Image.Image:
    """Decoded into a file of its own and read as a file input is: the same limits and messages, then removed."""
    header, _, payload = image.url.partition(",")
    if header.lower().endswith(";base64") and not re.search(r"\s", payload):  # its size known before decoding
        size = len(payload) // 4 * 3 - payload[-2:].count("=")
        if size > limits.max_bytes:  # the message load_image gives a file
            raise InputError(f"{image.name}: the file is {size} bytes; the limit is {limits.max_bytes} bytes per "
                             f"image (IDEFICS_MAX_IMAGE_BYTES)")
    data = decode_data_url(image.name, image.url)
    suffix = ".dcm" if "dicom" in image.url[:64].partition(",")[0].lower() else ""
    handle, path = tempfile.mkstemp(prefix="idefics-data-", suffix=suffix)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        del data
        return load_image(image.name, Path(path), limits, reduce)
    finally:
        Path(path).unlink(missing_ok=True)
