"""DICOM files to RGB, written with pydicom in each test."""

import io

import numpy as np
import pytest
from PIL import Image

from idefics_cog.errors import InputError
from idefics_cog.images import Limits
from tests.helpers import dicom_bytes, load_bytes, ramp, row


def test_dicom_ramp_stays_a_ramp(tmp_path):
    values = row(load_bytes(tmp_path, dicom_bytes(ramp()), "scan.dcm"))
    assert values[0] == 0 and values[-1] == 255 and values == sorted(values) and len(set(values)) == 64


def test_dicom_is_recognised_by_its_preamble_without_an_extension(tmp_path):
    values = row(load_bytes(tmp_path, dicom_bytes(ramp()), "upload"))
    assert values[0] == 0 and values[-1] == 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    values = row(load_bytes(tmp_path, dicom_bytes(ramp(), "MONOCHROME1"), "scan.dcm"))
    assert values[0] == 255 and values[-1] == 0 and values == sorted(values, reverse=True)


def test_dicom_window_and_rescale_are_applied(tmp_path):
    # Stored 0..1000, rescaled to -1024..976 (CT-like), window 0 +/- 100 (the first of two windows).
    pixels = ramp(width=101, top=1000)
    data = dicom_bytes(pixels, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=[0, 40], WindowWidth=[200, 400])
    values = row(load_bytes(tmp_path, data, "ct.dcm"))
    hounsfield = pixels[0].astype(float) * 2 - 1024
    expected = np.round(np.clip((hounsfield + 100) / 200, 0, 1) * 255).astype(int).tolist()
    assert values == expected
    assert values[0] == 0 and values[-1] == 255 and 0 < values[51] < 255  # the window, not the whole range


def test_dicom_signed_pixels(tmp_path):
    values = row(load_bytes(tmp_path, dicom_bytes(ramp(top=2000, dtype=np.int16) - 1000), "signed.dcm"))
    assert values[0] == 0 and values[-1] == 255 and values == sorted(values)


def test_dicom_multiframe_uses_the_first_frame_and_says_so(tmp_path, caplog):
    frames = np.stack([ramp(), ramp()[:, ::-1], np.zeros((8, 64), np.uint16)])
    with caplog.at_level("INFO", logger="idefics_cog.dicom"):
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
        load_bytes(tmp_path, dicom_bytes(ramp()), "big.dcm", limits=Limits(max_pixels=100))


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
