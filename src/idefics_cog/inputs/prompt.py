"""Interleaved prompts: segments of text (`str`) and images (`int`, index in request order), encoded as
`IdeficsProcessor` does, except that text is never fetched as an image URL."""

import re
from dataclasses import dataclass

import torch
from PIL import Image
from transformers.models.idefics.processing_idefics import (
    image_attention_mask_for_packed_input_ids,
    incremental_to_binary_attention_mask,
)

from idefics_cog.errors import InputError

FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
IMAGE_TOKEN = "<image>"
END_OF_UTTERANCE = "<end_of_utterance>"
TEMPLATES = ("instruct", "raw")
DEFAULT_PROMPT = "What does this image show?"  # when a request gives neither prompt nor messages

Segment = str | int
_PLACEHOLDER = re.compile(re.escape(IMAGE_TOKEN))
# Only the template may write these: typed by a user they would forge turns, image markers or sequence ends.
CONTROL_TOKENS = (END_OF_UTTERANCE, FAKE_IMAGE_TOKEN, "<s>", "</s>", "<unk>")


def as_plain_text(text: str, tokens: tuple[str, ...] = CONTROL_TOKENS) -> str:
    """A zero-width space after the `<`: visible text that no special token matches."""
    for token in tokens:
        text = text.replace(token, f"<\u200b{token[1:]}")
    return text


def build_segments(text: str, num_images: int, template: str = "instruct", system_prompt: str = "") -> list[Segment]:
    """`<image>` placeholders bind the images in order, one per image; without them the images end the first user
    turn, or lead a `raw` prompt without turns. Only `raw` may write control tokens."""
    if template not in TEMPLATES:
        raise InputError(f"template: must be one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "instruct":
        text, system_prompt = as_plain_text(text), as_plain_text(system_prompt)
    system_prompt = as_plain_text(system_prompt, (IMAGE_TOKEN,))  # images bind to the prompt's placeholders only
    parts = _PLACEHOLDER.split(text)
    placeholders = len(parts) - 1
    if placeholders and placeholders != num_images:
        raise InputError(
            f"prompt: has {placeholders} {IMAGE_TOKEN} placeholder(s) but {num_images} image(s) were given "
            f"(image, then images); use one placeholder per image, or none to place them automatically"
        )
    if placeholders:
        user: list[Segment] = [parts[0]]
        for index, part in enumerate(parts[1:]):
            user += [index, part]
    else:
        user = [text]
    user = [s for s in user if s != ""]
    images = list(range(num_images)) if not placeholders else []

    if template == "raw":
        segments = _place_in_first_turn(user, images) if images else user
    else:  # IDEFICS-instruct / MedIDEFICS: "User: {text}", <images>, "<end_of_utterance>", "\nAssistant:"
        if user and isinstance(user[0], str):
            user = [f"User: {user[0]}", *user[1:]]
        else:
            user = ["User:", *user]
        segments = [*user, *images, END_OF_UTTERANCE, "\nAssistant:"]
    if system_prompt:
        segments = [system_prompt.rstrip() + "\n", *segments]
    return segments


def _place_in_first_turn(user: list[Segment], images: list[int]) -> list[Segment]:
    (text,) = user or [""]
    head, marker, tail = text.partition(END_OF_UTTERANCE)
    if not marker:
        return [*images, text] if text else images
    return [s for s in (head, *images, marker + tail) if s != ""]


@dataclass
class Encoded:
    """Model inputs for one prompt (batch of 1), on CPU."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    image_attention_mask: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device, dtype) -> dict:
        return {
            "input_ids": self.input_ids.to(device),
            "attention_mask": self.attention_mask.to(device),
            "pixel_values": self.pixel_values.to(device, dtype),
            "image_attention_mask": self.image_attention_mask.to(device),
        }


def render(segments: list[Segment]) -> str:
    """Built as IdeficsProcessor builds it (text items stripped of spaces)."""
    full_text, last_was_image = "", False
    for segment in segments:
        if isinstance(segment, int):
            full_text += (IMAGE_TOKEN + FAKE_IMAGE_TOKEN) if last_was_image else (
                FAKE_IMAGE_TOKEN + IMAGE_TOKEN + FAKE_IMAGE_TOKEN)
            last_was_image = True
        else:
            full_text += segment.strip(" ")
            last_was_image = False
    return full_text


def tokenize(segments: list[Segment], tokenizer) -> list[int]:
    """Releases the GIL: run off the torch thread and the event loop."""
    return tokenizer(tokenizer.bos_token + render(segments), add_special_tokens=False)["input_ids"]


def encode(segments: list[Segment], images: list[Image.Image], processor, ids: list[int] | None = None) -> Encoded:
    """`ids`: when `tokenize` has already made them."""
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    ordered = [images[s] for s in segments if isinstance(s, int)]
    input_ids = torch.tensor([tokenize(segments, tokenizer) if ids is None else ids], dtype=torch.long)
    if ordered:
        pixel_values = image_processor(ordered, return_tensors="pt").unsqueeze(0)  # (1, images, C, H, W)
        incremental, _ = image_attention_mask_for_packed_input_ids(input_ids, tokenizer, "pt")
        image_attention_mask = incremental_to_binary_attention_mask(incremental, "pt", num_classes=len(ordered))
    else:  # text only: one blank image that no token attends to, as the processor does
        size = image_processor.image_size
        pixel_values = torch.zeros(1, 1, image_processor.image_num_channels, size, size)
        image_attention_mask = torch.zeros(1, input_ids.shape[1], 1, dtype=torch.bool)
    return Encoded(input_ids, torch.ones_like(input_ids), pixel_values, image_attention_mask)
