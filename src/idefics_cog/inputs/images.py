"""The request's image files to RGB images: every format Pillow decodes but EPS (Ghostscript), and DICOM; limits
checked before any pixel is decoded, and each image resized at once as the processor would."""

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from idefics_cog.config import MAX_IMAGE_PIXELS, ImageLimits
from idefics_cog.errors import InputError, reason as _reason
from idefics_cog.inputs.dicom import load_dicom

log = logging.getLogger(__name__)

# Pillow's own guard (DecompressionBombError at twice this), behind the explicit check in `load_image`.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

PILLOW_FORMATS = None  # filled on first use


@dataclass(frozen=True)
class Reduction:
    """The image processor's Pillow resize, done at decoding: its own resize later leaves the pixels unchanged."""
    width: int
    height: int
    resample: int

    @classmethod
    def of(cls, image_processor) -> "Reduction | None":
        """None when the processor's resize is not a fixed height x width Pillow resize."""
        size = getattr(image_processor, "size", None)
        height, width = getattr(size, "height", None), getattr(size, "width", None)
        if (not getattr(image_processor, "do_resize", False) or not height or not width
                or getattr(image_processor, "backend", None) != "pil"):
            return None
        return cls(int(width), int(height), int(image_processor.resample))

    def apply(self, image: Image.Image) -> Image.Image:
        return image.resize((self.width, self.height), resample=self.resample)


def image_inputs(image: Path | None, images: list[Path] | None) -> list[tuple[str, Path]]:
    """(input name, path), `image` first."""
    named = [("image", image)] if image is not None else []
    return named + [(f"images[{i}]", path) for i, path in enumerate(images or [])]


def check_count(count: int, limit: int, inputs: str = "image, images") -> None:
    """`inputs`: the inputs the images came from, as the message names them."""
    if count > limit:
        raise InputError(f"{inputs}: {count} images given; the limit is {limit} per request (IDEFICS_MAX_IMAGES)")


# Files people send by mistake, recognised by their first bytes, for a clearer message.
NOT_IMAGES = {b"%PDF": "a PDF document", b"PK\x03\x04": "a zip archive", b"PK\x05\x06": "an empty zip archive",
              b"\x1f\x8b": "a gzip file", b"ustar": "a tar archive"}


def load_image(name: str, path: Path, limits: ImageLimits | None = None,
               reduce: Reduction | None = None) -> Image.Image:
    """Decoded fully, so a truncated file fails here, not in the model. `limits`: by default from the environment."""
    picture = decode_image(name, path, limits or ImageLimits.from_env())
    return reduce.apply(picture) if reduce else picture


def decode_image(name: str, path: Path, limits: ImageLimits) -> Image.Image:
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{name}: the file is not a readable image (it is empty: 0 bytes)")
    if size > limits.max_bytes:
        raise InputError(f"{name}: the file is {size} bytes; the limit is {limits.max_bytes} bytes per image "
                         f"(IDEFICS_MAX_IMAGE_BYTES)")
    with open(path, "rb") as file:
        head = file.read(264)
    for magic, kind in NOT_IMAGES.items():
        if head.startswith(magic) or (magic == b"ustar" and head[257:262] == magic):
            raise InputError(f"{name}: the file is not a readable image (it is {kind})")
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        return load_dicom(name, path, lambda w, h: check_dimensions(name, w, h, limits), limits.max_bytes)
    return load_pillow(name, path, limits)


def check_dimensions(name: str, width: int, height: int, limits: ImageLimits) -> None:
    if width < 1 or height < 1:
        raise InputError(f"{name}: the file has no pixels ({width}x{height})")
    if width * height > limits.max_pixels:
        raise InputError(f"{name}: the file is {width}x{height} = {width * height} pixels; the limit is "
                         f"{limits.max_pixels} pixels per image (IDEFICS_MAX_IMAGE_PIXELS)")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise InputError(f"{name}: the file is {width}x{height}, an aspect ratio of {ratio:g}:1; the limit is "
                         f"{limits.max_aspect_ratio:g}:1 (IDEFICS_MAX_ASPECT_RATIO)")


def pillow_formats() -> list[str]:
    global PILLOW_FORMATS
    if PILLOW_FORMATS is None:
        Image.init()
        PILLOW_FORMATS = sorted(f for f in Image.OPEN if f != "EPS")
    return PILLOW_FORMATS


def load_pillow(name: str, path: Path, limits: ImageLimits) -> Image.Image:
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():  # Pillow warns between 1x and 2x its limit; check_dimensions refuses
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path, formats=pillow_formats())
        with opened:
            check_dimensions(name, *opened.size, limits)
            if getattr(opened, "n_frames", 1) > 1:
                log.info("%s: the file has %d frames; using the first", name, opened.n_frames)
            opened.load()
            return to_rgb(ImageOps.exif_transpose(opened))  # a copy: `opened` is unusable once closed
    except InputError:  # a ValueError itself
        raise
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "too many pixels"
        raise InputError(f"{name}: the file is {size} (a decompression bomb?); the limit is {limits.max_pixels} "
                         f"pixels per image (IDEFICS_MAX_IMAGE_PIXELS)") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError(f"{name}: the file is not a readable image ({_reason(exc, path)})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Transparency is composited on white: the model never saw alpha."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return gray_to_rgb(np.asarray(image), 65535 if image.mode.startswith("I;16") else None)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode == "RGB":  # no copy: a 40-megapixel picture is 120 MB
        return image
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def gray_to_rgb(pixels: np.ndarray, full_scale: float | None = None) -> Image.Image:
    """Darkest to 0, brightest to 255, so a 12- or 16-bit image keeps its contrast; a uniform one its level."""
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if high > low:
        scaled = (values - low) / (high - low)
    else:
        scaled = np.full(values.shape, min(max(low / full_scale, 0.0), 1.0) if full_scale else 0.0)
    return Image.fromarray(np.round(scaled * 255).astype(np.uint8), "L").convert("RGB")
