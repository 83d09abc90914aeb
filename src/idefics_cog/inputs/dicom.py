"""DICOM files to the RGB images the vision tower expects, through pydicom's own display pipeline (modality LUT,
first VOI, palette), a deflated dataset inflated here under the byte limit."""

import io
import logging
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from idefics_cog.errors import InputError, reason

log = logging.getLogger(__name__)

SUPPORTED = "MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB and YBR"
INFLATE_STEP = 1 << 16  # bytes read, and at most bytes inflated, at a time


def load_dicom(name: str, path: Path, check_size: Callable[[int, int], None], max_bytes: int) -> Image.Image:
    """`check_size(width, height)` runs before any pixel is decoded; every refusal is an InputError naming `name`."""
    source = undeflated(name, path, max_bytes)
    dataset = read_header(name, source, path)
    check_size(int(dataset.Columns), int(dataset.Rows))
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR") and not photometric.startswith("YBR"):
        raise InputError(f"{name}: the file is a DICOM image in {photometric}, which is not supported "
                         f"({SUPPORTED} are)")
    dataset.PhotometricInterpretation = photometric  # pydicom's windowing reads it; absent means MONOCHROME2
    pixels = first_frame(name, source, path, dataset)
    try:
        if int(dataset.get("SamplesPerPixel", 1)) == 3:  # RGB (pydicom converts YBR to RGB)
            return rgb_image(pixels, int(dataset.get("BitsStored", 8) or 8))
        if photometric == "PALETTE COLOR":
            return palette_image(pixels, dataset)
        return grayscale_image(name, pixels, dataset, invert=photometric == "MONOCHROME1")
    except Exception as exc:  # pydicom and numpy raise many kinds
        raise InputError(f"{name}: the file is a DICOM image whose lookup tables cannot be applied "
                         f"({reason(exc, path)})") from None


def undeflated(name: str, path: Path, max_bytes: int) -> Path | io.BytesIO:
    """`path`, or a deflated dataset inflated in memory: pydicom's dcmread inflates with no cap (a 600 kB file took
    1.5 GB) and its pixel_array not at all."""
    try:
        with open(path, "rb") as file:
            start = uncompressed_start(file)
            inflated = None if start is None else inflate(file, start, max_bytes)
    except Exception as exc:  # pydicom, zlib and the file raise many kinds
        raise InputError(f"{name}: the file is not a readable DICOM image ({reason(exc, path)})") from None
    if start is None:
        return path
    if inflated is None:
        raise InputError(f"{name}: the file is a deflated DICOM that inflates to more than {max_bytes} bytes; the "
                         f"limit is {max_bytes} bytes per image (IDEFICS_MAX_IMAGE_BYTES)")
    return inflated


def uncompressed_start(file) -> bytes | None:
    """For a deflated dataset, the file's start rewritten as Explicit VR Little Endian, `file` left at the deflated
    data; None for any other file."""
    from pydicom.filereader import _read_command_set_elements, _read_file_meta_info, read_preamble
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    preamble = read_preamble(file, force=True)
    meta = _read_file_meta_info(file)
    meta_end = file.tell()
    _read_command_set_elements(file)
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    start = io.BytesIO()
    start.write(b"" if preamble is None else preamble + b"DICM")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    write_file_meta_info(start, meta, enforce_standard=False)
    command_set_end = file.tell()
    file.seek(meta_end)
    start.write(file.read(command_set_end - meta_end))
    return start.getvalue()


def inflate(file, start: bytes, max_bytes: int) -> io.BytesIO | None:
    """None as soon as the output passes `max_bytes`: a bomb costs `max_bytes` at most."""
    output = io.BytesIO(start)
    output.seek(0, io.SEEK_END)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    while not inflater.eof:  # bytes after the stream (pydicom pads to an even length) are ignored
        data = inflater.unconsumed_tail or file.read(INFLATE_STEP)
        chunk = inflater.decompress(data, INFLATE_STEP)
        if not data and not chunk:
            raise EOFError("the deflated dataset is cut short")
        if output.tell() + len(chunk) > max_bytes:
            return None
        output.write(chunk)
    output.seek(0)
    return output


def read_header(name: str, source: Path | io.BytesIO, path: Path):
    import pydicom

    try:
        dataset = pydicom.dcmread(source, stop_before_pixels=True, force=True)
        int(dataset.Rows), int(dataset.Columns)
    except Exception as exc:  # pydicom raises many kinds on a damaged or hostile header
        raise InputError(f"{name}: the file is not a readable DICOM image ({reason(exc, path)})") from None
    return dataset


def first_frame(name: str, source: Path | io.BytesIO, path: Path, dataset) -> np.ndarray:
    """The only frame shown."""
    from pydicom.pixels import pixel_array

    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        pixels = pixel_array(source, index=0 if frames > 1 else None)
    except Exception as exc:  # pydicom raises many kinds
        transfer = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        syntax = f" (transfer syntax {transfer.name})" if transfer is not None else ""
        raise InputError(f"{name}: the file is a DICOM file whose pixels cannot be decoded{syntax}: "
                         f"{reason(exc, path)}") from None
    if frames > 1:
        log.info("%s: the file is a DICOM with %d frames; using the first", name, frames)
    return pixels


def rgb_image(pixels: np.ndarray, bits_stored: int) -> Image.Image:
    if pixels.dtype != np.uint8:  # more than 8 bits per sample: scaled to 8
        pixels = np.clip(np.round(pixels.astype(np.float64) * 255 / (2 ** bits_stored - 1)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def palette_image(pixels: np.ndarray, dataset) -> Image.Image:
    """An Alpha Palette is composited on white: the model never saw transparency."""
    from pydicom.pixels import apply_color_lut

    entries = apply_color_lut(pixels, dataset)  # uint8 or uint16
    colors = entries.astype(np.float64) / np.iinfo(entries.dtype).max
    if colors.shape[-1] == 4:
        alpha = colors[..., 3:]
        colors = colors[..., :3] * alpha + (1 - alpha)
    return Image.fromarray(np.round(colors * 255).astype(np.uint8), "RGB")


def grayscale_image(name: str, pixels: np.ndarray, dataset, invert: bool) -> Image.Image:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(pixels, dataset)
    voi = voi_output_range(name, dataset)
    if voi is None:  # no VOI: the whole range of this image
        low, high = float(values.min()), float(values.max())
    else:
        low, high = voi
        if has_voi_lut_sequence(dataset):  # a LUT's inputs are whole numbers (pydicom warns on floats)
            values = np.rint(values).astype(np.int64)
            widen_8_bit_lut(dataset.VOILUTSequence[0])
        values = apply_voi_lut(values, dataset, index=0)
    values = values.astype(np.float64)
    scaled = np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else np.zeros(values.shape)
    gray = np.round(scaled * 255).astype(np.uint8)
    if invert:  # MONOCHROME1: 0 is white
        gray = 255 - gray
    return Image.fromarray(gray, "L").convert("RGB")


def has_voi_lut_sequence(dataset) -> bool:
    """As pydicom's apply_voi_lut decides (then preferred to a window)."""
    sequence = dataset.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def widen_8_bit_lut(item) -> None:
    """pydicom 3.0.2: apply_voi indexes an 8-bit LUT of more than 256 entries with uint8, which wraps around."""
    entries, first, bits = item.LUTDescriptor
    if bits == 8:
        item.LUTDescriptor = [entries, first, 16]


def voi_output_range(name: str, dataset) -> tuple[float, float] | None:
    """The first VOI's darkest and brightest outputs (to become 0 and 255); None without a VOI, or for a window
    pydicom refuses."""
    from pydicom.pixels import apply_windowing

    if has_voi_lut_sequence(dataset):
        return 0.0, float(2 ** int(dataset.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if any(dataset.get(key) in (None, "") for key in ("WindowCenter", "WindowWidth")):
        return None
    try:
        low, high = apply_windowing(np.array([-np.inf, np.inf]), dataset, index=0)
    except ValueError as exc:
        log.warning("%s: the DICOM window is not applied (%s); using the image's own range", name, exc)
        return None
    return float(low), float(high)
