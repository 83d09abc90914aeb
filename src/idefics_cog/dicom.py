"""DICOM files to the RGB PIL images the vision tower expects (moved out of images.py as it was)."""

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from idefics_cog.errors import InputError, reason

log = logging.getLogger(__name__)


def first_value(value):
    """WindowCenter/WindowWidth may hold several values (several windows): the first is the default one."""
    if value is None:
        return None
    try:
        return float(value[0]) if not isinstance(value, (str, bytes)) and len(value) else float(value)
    except TypeError:
        return float(value)


def load_dicom(name: str, path: Path, check_size: Callable[[int, int], None]) -> Image.Image:
    """A DICOM image to RGB: first frame, modality rescale, the stored window (or min/max), MONOCHROME1 inverted."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import pixel_array

    try:
        dataset = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except (InvalidDicomError, AttributeError, ValueError, TypeError, OSError, EOFError) as exc:
        raise InputError(f"{name}: the file is not a readable DICOM image ({reason(exc, path)})") from None
    check_size(columns, rows)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB") and not photometric.startswith("YBR"):
        raise InputError(f"{name}: the file is a DICOM image in {photometric}, which is not supported "
                         f"(MONOCHROME1, MONOCHROME2, RGB and YBR are)")
    try:
        pixels = pixel_array(str(path), index=0 if frames > 1 else None)
    except Exception as exc:  # pydicom raises many kinds (missing decoder, short pixel data, bad attributes)
        transfer = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        syntax = f" (transfer syntax {transfer.name})" if transfer is not None else ""
        raise InputError(f"{name}: the file is a DICOM file whose pixels cannot be decoded{syntax}: {reason(exc, path)}") from None
    if frames > 1:
        log.info("%s: the file is a DICOM with %d frames; using the first", name, frames)
    if int(dataset.get("SamplesPerPixel", 1)) == 3:  # RGB (pydicom converts YBR to RGB)
        if pixels.dtype != np.uint8:
            bits = int(dataset.get("BitsStored", 8) or 8)
            pixels = np.clip(np.round(pixels.astype(np.float64) * 255 / (2 ** bits - 1)), 0, 255)
        return Image.fromarray(pixels.astype(np.uint8), "RGB")
    values = pixels.astype(np.float64) * float(dataset.get("RescaleSlope", 1) or 1)
    values += float(dataset.get("RescaleIntercept", 0) or 0)
    center, width = first_value(dataset.get("WindowCenter")), first_value(dataset.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        low, high = center - width / 2, center + width / 2
    else:  # no stored window: the whole range of this image
        low, high = float(values.min()), float(values.max())
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros(values.shape)
    gray = np.round(scaled * 255).astype(np.uint8)
    if photometric == "MONOCHROME1":  # 0 is white
        gray = 255 - gray
    return Image.fromarray(gray, "L").convert("RGB")
