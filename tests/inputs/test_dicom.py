"""DICOM files to RGB through pydicom's modality LUT, VOI LUT (window or LUT sequence), palette and color
handling, written with pydicom in each test so that the expected pixels follow from the file's own attributes."""

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from idefics_cog.errors import InputError
from idefics_cog.config import ImageLimits
from tests.support.images import COLORS, deflated, dicom_bytes, load_bytes, palette_dicom, ramp, row


def test_dicom_ramp_stays_a_ramp(tmp_path):
    values = row(load_bytes(tmp_path, dicom_bytes(ramp()), "scan.dcm"))
    assert values[0] == 0 and values[-1] == 255 and values == sorted(values) and len(set(values)) == 64


def test_dicom_is_recognised_by_its_preamble_without_an_extension(tmp_path):
    values = row(load_bytes(tmp_path, dicom_bytes(ramp()), "upload"))
    assert values[0] == 0 and values[-1] == 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    values = row(load_bytes(tmp_path, dicom_bytes(ramp(), "MONOCHROME1"), "scan.dcm"))
    assert values[0] == 255 and values[-1] == 0 and values == sorted(values, reverse=True)


def linear(values, center: float, width: float) -> list[int]:
    """DICOM's LINEAR window (PS3.3 C.11.2.1.2.1: center - 0.5, width - 1) to 0..255, written out independently."""
    fraction = np.clip((np.asarray(values, float) - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    return np.round(fraction * 255).astype(int).tolist()


def test_dicom_window_and_rescale_are_applied(tmp_path):
    # Stored 0..1000, rescaled to -1024..976 (CT-like), window 0 +/- 100 (the first of two windows).
    pixels = ramp(width=101, top=1000)
    data = dicom_bytes(pixels, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=[0, 40], WindowWidth=[200, 400])
    values = row(load_bytes(tmp_path, data, "ct.dcm"))
    hounsfield = pixels[0].astype(float) * 2 - 1024
    assert values == linear(hounsfield, 0, 200)
    assert values != linear(hounsfield, 40, 400)  # the second window would give other values
    assert values[0] == 0 and values[-1] == 255 and 0 < values[51] < 255  # the window, not the whole range


def test_dicom_signed_pixels(tmp_path):
    values = row(load_bytes(tmp_path, dicom_bytes(ramp(top=2000, dtype=np.int16) - 1000), "signed.dcm"))
    assert values[0] == 0 and values[-1] == 255 and values == sorted(values)


def test_dicom_multiframe_uses_the_first_frame_and_says_so(tmp_path, caplog):
    frames = np.stack([ramp(), ramp()[:, ::-1], np.zeros((8, 64), np.uint16)])
    with caplog.at_level("INFO", logger="idefics_cog.inputs.dicom"):
        values = row(load_bytes(tmp_path, dicom_bytes(frames), "cine.dcm", name="images[1]"))
    assert values[0] == 0 and values[-1] == 255 and values == sorted(values)
    assert "images[1]: the file is a DICOM with 3 frames; using the first" in caplog.text


def test_dicom_rgb(tmp_path):
    pixels = np.zeros((4, 6, 3), np.uint8)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 200, 100, 50
    image = load_bytes(tmp_path, dicom_bytes(pixels, "RGB"), "photo.dcm")
    assert image.mode == "RGB" and image.size == (6, 4) and image.getpixel((3, 2)) == (200, 100, 50)


def test_dicom_over_the_pixel_limit_is_refused_before_decoding(tmp_path):
    with pytest.raises(InputError, match=r"image: the file is 64x8 = 512 pixels; the limit is 100 pixels"):
        load_bytes(tmp_path, dicom_bytes(ramp()), "big.dcm", limits=ImageLimits(max_pixels=100))


def test_broken_dicom_names_the_input(tmp_path):
    data = dicom_bytes(ramp())
    with pytest.raises(InputError, match=r"images\[0\]: the file is a DICOM file whose pixels cannot be decoded"):
        load_bytes(tmp_path, data[:-500], "cut.dcm", name="images[0]")


def jpeg_dicom(jpeg: bytes) -> bytes:
    """A DICOM file whose pixel data is one encapsulated JPEG baseline frame (8-bit grayscale ramp header)."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    dataset = dcmread(io.BytesIO(dicom_bytes(ramp(top=255, dtype=np.uint8))))
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.PixelData = encapsulate([jpeg])
    dataset["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    dataset.save_as(buffer)
    return buffer.getvalue()


def test_jpeg_compressed_dicom_is_decoded(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(ramp(top=255, dtype=np.uint8), "L").save(buffer, "JPEG", quality=100)
    values = row(load_bytes(tmp_path, jpeg_dicom(buffer.getvalue()), "jpeg.dcm"))
    assert values[0] <= 3 and values[-1] >= 252 and abs(values[32] - 129) <= 6


def test_undecodable_compressed_dicom_names_its_transfer_syntax(tmp_path):
    with pytest.raises(InputError, match=r"image: the file is a DICOM file whose pixels cannot be decoded "
                                         r"\(transfer syntax JPEG Baseline \(Process 1\)\)"):
        load_bytes(tmp_path, jpeg_dicom(b"\xff\xd8garbage\xff\xd9"), "bad.dcm")


# --- Lookup tables: VOI LUT Sequence, window functions, palette color ----------------------------------------

def lut_item(bits: int, entries: list[int], first: int = 0) -> Dataset:
    """An item of a (Modality or VOI) LUT Sequence: `entries` map stored values first, first + 1, ..."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [len(entries), first, bits])  # both VRs are ambiguous: name them
    item.add_new("LUTData", "US", entries)
    return item


STEPS = [255 - (value // 1024) * 85 for value in range(4096)]  # four levels, brightest first
INVERSE_12_BIT = [4095 - value for value in range(4096)]


@pytest.mark.parametrize("bits, entries, expected", [
    (8, STEPS, lambda stored: 255 - (stored // 1024) * 85),
    (12, INVERSE_12_BIT, lambda stored: np.round((4095 - stored) / 4095 * 255)),
], ids=["8-bit inverted steps", "12-bit inverse"])
def test_voi_lut_sequence_is_applied_in_place_of_the_window(tmp_path, bits, entries, expected):
    pixels = ramp()
    data = dicom_bytes(pixels, VOILUTSequence=[lut_item(bits, entries)], WindowCenter=2048, WindowWidth=4096)
    values = row(load_bytes(tmp_path, data, "lut.dcm"))
    assert values == expected(pixels[0].astype(int)).astype(int).tolist()
    assert values[0] == 255 and values[-1] == 0  # inverted: the window alone would keep the ramp rising


def test_modality_lut_sequence_is_applied_before_the_window(tmp_path):
    # The modality LUT doubles the stored value (0..200 -> 0..400); the window 200 +/- 100 then shows the middle.
    pixels = ramp(width=101, top=200)
    data = dicom_bytes(pixels, ModalityLUTSequence=[lut_item(16, [2 * v for v in range(201)])],
                       WindowCenter=200, WindowWidth=200)
    values = row(load_bytes(tmp_path, data, "mlut.dcm"))
    assert values == linear(pixels[0] * 2, 200, 200)


def test_sigmoid_window(tmp_path):
    pixels = ramp()
    data = dicom_bytes(pixels, WindowCenter=2048, WindowWidth=1000, VOILUTFunction="SIGMOID")
    values = row(load_bytes(tmp_path, data, "sigmoid.dcm"))
    sigmoid = 1 / (1 + np.exp(-4 * (pixels[0].astype(float) - 2048) / 1000))  # PS3.3 C.11.2.1.3.1
    assert values == np.round(sigmoid * 255).astype(int).tolist()
    assert values != linear(pixels[0], 2048, 1000)  # not the LINEAR window with the same center and width


def test_linear_exact_window(tmp_path):
    pixels = ramp(width=101, top=100)
    data = dicom_bytes(pixels, WindowCenter=50, WindowWidth=10, VOILUTFunction="LINEAR_EXACT")
    values = row(load_bytes(tmp_path, data, "exact.dcm"))
    exact = np.clip((pixels[0].astype(float) - 50) / 10 + 0.5, 0, 1)  # PS3.3 C.11.2.1.3.2: no 0.5 and 1 offsets
    assert values == np.round(exact * 255).astype(int).tolist()
    assert values != linear(pixels[0], 50, 10)


def test_monochrome1_is_inverted_after_the_window(tmp_path):
    pixels = ramp()
    data = dicom_bytes(pixels, "MONOCHROME1", WindowCenter=1000, WindowWidth=1000)
    values = row(load_bytes(tmp_path, data, "mono1.dcm"))
    assert values == [255 - value for value in linear(pixels[0], 1000, 1000)]


def test_a_window_narrower_than_one_is_skipped_as_before(tmp_path, caplog):
    # pydicom refuses a LINEAR window under 1 wide; such a file showed its whole range before, and still does.
    with caplog.at_level("WARNING", logger="idefics_cog.inputs.dicom"):
        values = row(load_bytes(tmp_path, dicom_bytes(ramp(), WindowCenter=100, WindowWidth=0), "flat.dcm"))
    assert values[0] == 0 and values[-1] == 255 and len(set(values)) == 64
    assert "image: the DICOM window is not applied" in caplog.text


def test_an_empty_window_is_no_window(tmp_path):
    values = row(load_bytes(tmp_path, dicom_bytes(ramp(), WindowCenter="", WindowWidth=""), "empty.dcm"))
    assert values[0] == 0 and values[-1] == 255 and len(set(values)) == 64


@pytest.mark.parametrize("bits", [8, 16])
def test_palette_color_maps_each_value_to_its_color(tmp_path, bits):
    stored = np.arange(30, dtype=np.uint8).reshape(5, 6) % len(COLORS)
    image = load_bytes(tmp_path, palette_dicom(stored, bits), "palette.dcm")
    assert image.mode == "RGB" and image.size == (6, 5)
    assert (np.asarray(image) == np.array(COLORS, np.uint8)[stored]).all()


def test_palette_color_with_a_too_short_table_names_the_input(tmp_path):
    stored = np.zeros((4, 4), np.uint8)
    data = palette_dicom(stored, 16, GreenPaletteColorLookupTableData=b"\0\0")
    with pytest.raises(InputError, match=r"images\[2\]: the file is a DICOM image whose lookup tables cannot be "
                                         r"applied \(LUT data must be the same length\)"):
        load_bytes(tmp_path, data, "bad.dcm", name="images[2]")


def test_unsupported_photometric_interpretation_names_what_is(tmp_path):
    with pytest.raises(InputError, match=r"image: the file is a DICOM image in HSV, which is not supported "
                                         r"\(MONOCHROME1, MONOCHROME2, PALETTE COLOR, RGB and YBR are\)"):
        load_bytes(tmp_path, dicom_bytes(ramp(), "HSV"), "hsv.dcm")


def test_a_lookup_table_that_overflows_names_the_input(tmp_path):
    # A Modality LUT whose first mapped value (300) is beyond 8-bit pixels: pydicom's subtraction overflows uint8.
    data = dicom_bytes(ramp(top=255, dtype=np.uint8), ModalityLUTSequence=[lut_item(8, list(range(10)), first=300)])
    with pytest.raises(InputError, match=r"images\[1\]: the file is a DICOM image whose lookup tables cannot be "
                                         r"applied \(.*out of bounds for uint8\)"):
        load_bytes(tmp_path, data, "overflow.dcm", name="images[1]")


def test_a_voi_lut_of_absurd_depth_names_the_input(tmp_path):
    data = dicom_bytes(ramp(), VOILUTSequence=[lut_item(2000, list(range(10)))])  # 2^2000 is no float
    with pytest.raises(InputError, match=r"image: the file is a DICOM image whose lookup tables cannot be applied"):
        load_bytes(tmp_path, data, "deep.dcm")


# --- Deflated Explicit VR Little Endian: inflated here, under the byte limit --------------------------------------

def test_deflated_dicom_decodes_as_its_uncompressed_twin(tmp_path):
    pixels = ramp(width=101, top=1000)
    plain = dicom_bytes(pixels, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=200)
    packed = deflated(plain)
    assert b"1.2.840.10008.1.2.1.99" in packed and len(packed) < len(plain)
    image = load_bytes(tmp_path, packed, "packed.dcm")
    assert (np.asarray(image) == np.asarray(load_bytes(tmp_path, plain, "plain.dcm"))).all()
    assert row(image) == linear(pixels[0].astype(float) * 2 - 1024, 0, 200)


@pytest.mark.slow
def test_deflated_dicom_bomb_is_refused_before_it_inflates(tmp_path):
    # 60 MB of zero pixels deflate to about 60 kB; the limit an uncompressed file would meet is 5 MB.
    inflated_size = 60_000_000
    bomb = deflated(dicom_bytes(np.zeros((60, 1000, 500), np.uint16)))
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"^image: the file is a deflated DICOM that inflates to more than "
                                             r"5000000 bytes; the limit is 5000000 bytes per image "
                                             r"\(IDEFICS_MAX_IMAGE_BYTES\)$"):
            load_bytes(tmp_path, bomb, "bomb.dcm", limits=ImageLimits(max_bytes=5_000_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < inflated_size / 4


def test_deflated_dicom_cut_short_names_the_input(tmp_path):
    packed = deflated(dicom_bytes(np.random.default_rng(0).integers(0, 4096, (64, 64), np.uint16)))
    with pytest.raises(InputError, match=r"images\[3\]: the file is not a readable DICOM image \(the deflated "
                                         r"dataset is cut short\)"):
        load_bytes(tmp_path, packed[:-1000], "cut.dcm", name="images[3]")
