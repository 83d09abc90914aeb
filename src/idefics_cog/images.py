"""Read the request's image files into the RGB PIL images the vision tower expects."""

from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from idefics_cog.errors import InputError


def image_inputs(image: Path | None, images: list[Path] | None) -> list[tuple[str, Path]]:
    """The request's images in binding order (`image` first, then `images`), each with the input name to report."""
    named = [("image", image)] if image is not None else []
    return named + [(f"images[{i}]", path) for i, path in enumerate(images or [])]


def check_count(count: int, limit: int) -> None:
    if count > limit:
        raise InputError(
            f"image, images: {count} images given; the limit is {limit} per request (IDEFICS_MAX_IMAGES)"
        )


def load_image(name: str, path: Path) -> Image.Image:
    """Decode one file fully (so a truncated file fails here, not in the model) and convert it to RGB."""
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"{name}: {Path(path).name} is not a readable image ({exc})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited on white (the model never saw alpha)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
