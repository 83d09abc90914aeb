"""DICOM files to the RGB PIL images the vision tower expects, through pydicom's own display pipeline.

Grayscale (MONOCHROME1/2): the first frame's stored values go through pydicom's `apply_modality_lut` (Modality LUT
Sequence, else RescaleSlope/RescaleIntercept), then `apply_voi_lut` with the first view (VOI LUT Sequence, else
WindowCenter/WindowWidth with its VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID); the result is scaled from the
VOI's output range to 0-255 (without a VOI, from the image's own minimum to maximum) and MONOCHROME1 is inverted.
PALETTE COLOR goes through `apply_color_lut`. RGB and YBR (converted to RGB by pydicom) are kept, 8 bits per sample.
A deflated dataset (Deflated Explicit VR Little Endian) is inflated here, a step at a time, under the byte limit.
"""

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
    """Read the header, let `check_size(width, height)` refuse the image before any pixel is decoded, then decode
    the first frame to RGB. A deflated file is refused once it inflates past `max_bytes` (the limit the file itself
    met). Every refusal is an InputError that names the input (`name`)."""
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
    except Exception as exc:  # pydicom and numpy raise many kinds (bad tables, OverflowError, MemoryError)
        raise InputError(f"{name}: the file is a DICOM image whose lookup tables cannot be applied "
                         f"({reason(exc, path)})") from None


def undeflated(name: str, path: Path, max_bytes: int) -> Path | io.BytesIO:
    """The file to read: `path` itself, or for a deflated dataset the same file uncompressed, in memory. pydicom's
    dcmread inflates a whole dataset at once with no cap (a 600 kB file took 1.5 GB) and its pixel_array does not
    inflate at all."""
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
    """For a deflated dataset, the start of the same file uncompressed: the preamble, the file meta naming Explicit
    VR Little Endian, any command set; `file` is left at the deflated data. None for any other file. What precedes
    the dataset is never deflated, and is read here as dcmread reads it."""
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
    """`start` followed by the rest of `file` inflated, or None as soon as that passes `max_bytes`: no step inflates
    more than INFLATE_STEP bytes, so a bomb costs `max_bytes` at most, not its inflated size."""
    output = io.BytesIO(start)
    output.seek(0, io.SEEK_END)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    while not inflater.eof:  # bytes after the end of the stream (pydicom pads to an even length) are ignored
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
    """Every element before the pixel data: the size, the photometric interpretation and the lookup tables."""
    import pydicom

    try:
        dataset = pydicom.dcmread(source, stop_before_pixels=True, force=True)
        int(dataset.Rows), int(dataset.Columns)
    except Exception as exc:  # pydicom raises many kinds on a damaged or hostile header
        raise InputError(f"{name}: the file is not a readable DICOM image ({reason(exc, path)})") from None
    return dataset


def first_frame(name: str, source: Path | io.BytesIO, path: Path, dataset) -> np.ndarray:
    """The stored values of the first frame (the only one shown; a multi-frame file is logged as such)."""
    from pydicom.pixels import pixel_array

    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        pixels = pixel_array(source, index=0 if frames > 1 else None)
    except Exception as exc:  # pydicom raises many kinds (missing decoder, short pixel data, bad attributes)
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
    """Each stored value looked up in the Red/Green/Blue Palette Color LUTs (plain or segmented); 16-bit entries
    scaled to 8 bits, and an Alpha Palette composited on white (the model never saw transparency)."""
    from pydicom.pixels import apply_color_lut

    entries = apply_color_lut(pixels, dataset)  # uint8 or uint16, as the palette's data is stored
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
    """As pydicom's apply_voi_lut decides: a first item with both a descriptor and data (then preferred to a window)."""
    sequence = dataset.get("VOILUTSequence")
    return bool(sequence) and "LUTDescriptor" in sequence[0] and "LUTData" in sequence[0]


def widen_8_bit_lut(item) -> None:
    """pydicom 3.0.2's apply_voi indexes a LUT with integers of the LUT's own type, so an 8-bit LUT of more than 256
    entries (a 12-bit image's) wraps around; declared as 16-bit it holds the same values and is indexed right.
    Done after `voi_output_range` has read the 8-bit output range."""
    entries, first, bits = item.LUTDescriptor
    if bits == 8:
        item.LUTDescriptor = [entries, first, 16]


def voi_output_range(name: str, dataset) -> tuple[float, float] | None:
    """The darkest and brightest values the dataset's first VOI gives, which become 0 and 255; None when it has no
    VOI to apply. A VOI LUT Sequence outputs 0 .. 2^bits - 1 (its descriptor's third value); a window outputs what
    pydicom's windowing gives for the lowest and highest possible inputs. A window pydicom refuses (a width below 1,
    an unknown VOI LUT Function) is skipped, as it was before pydicom did the windowing."""
    from pydicom.pixels import apply_windowing

    if has_voi_lut_sequence(dataset):
        return 0.0, float(2 ** int(dataset.VOILUTSequence[0].LUTDescriptor[2]) - 1)
    if any(dataset.get(key) in (None, "") for key in ("WindowCenter", "WindowWidth")):  # absent or empty
        return None
    try:
        low, high = apply_windowing(np.array([-np.inf, np.inf]), dataset, index=0)
    except ValueError as exc:
        log.warning("%s: the DICOM window is not applied (%s); using the image's own range", name, exc)
        return None
    return float(low), float(high)
