"""Small shared helpers for the tests: synthetic images and data URIs."""

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def save_png(image: Image.Image, path: Path) -> Path:
    image.save(path, "PNG")
    return path


def data_uri(image_or_bytes, mime: str = "image/png") -> str:
    if isinstance(image_or_bytes, Image.Image):
        buffer = io.BytesIO()
        image_or_bytes.save(buffer, "PNG")
        image_or_bytes = buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(image_or_bytes).decode()}"


def tar_bytes(folder: Path, top: str | None = None) -> bytes:
    """A .tar.gz of `folder`'s files (under a top-level directory `top` when given)."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"{top}/{path.name}" if top else path.name)
    return buffer.getvalue()
