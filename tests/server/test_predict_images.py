"""Image formats and hostile image files through the real Cog server (coglet), as a client would send them."""

import re

import numpy as np
import pytest
from PIL import Image

from tests.support.helpers import answer, data_uri, noise_image
from tests.support.images import COLORS, dicom_bytes, palette_dicom, png_header, ramp, zip_bytes

BASELINE = {"image": data_uri(noise_image(7)), "prompt": "What is shown?", "max_new_tokens": 6, "adapter": "none"}


def png16_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(ramp(top=65535), "I;16").save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def baseline(server):
    return answer(server, BASELINE)


GOOD = {
    "dicom": data_uri(dicom_bytes(ramp()), "application/dicom"),
    "dicom monochrome1 multi-frame": data_uri(dicom_bytes(np.stack([ramp(), ramp()]), "MONOCHROME1"),
                                              "application/dicom"),
    "16-bit png": data_uri(png16_bytes(), "image/png"),
    "1x1 png": data_uri(Image.new("RGB", (1, 1), (9, 9, 9))),
}


@pytest.mark.parametrize("case", GOOD)
def test_medical_and_odd_formats_succeed(server, case):
    assert answer(server, {"image": GOOD[case], "prompt": "What is shown?", "max_new_tokens": 4})


def test_dicom_and_the_same_pixels_as_png_give_the_same_answer(server):
    # The DICOM ramp converted by the server equals the 8-bit ramp sent as a PNG: the model got the same pixels.
    gray = np.round(ramp().astype(float) / 4095 * 255).astype(np.uint8)
    as_png = data_uri(Image.fromarray(gray, "L").convert("RGB"))
    inputs = {"prompt": "What is shown?", "max_new_tokens": 8, "adapter": "none"}
    assert answer(server, {**inputs, "image": GOOD["dicom"]}) == answer(server, {**inputs, "image": as_png})


def test_palette_color_dicom_and_its_colors_as_png_give_the_same_answer(server):
    # Each stored value of the PALETTE COLOR file becomes its palette's color: the model got the PNG's pixels.
    stored = np.random.default_rng(3).integers(0, len(COLORS), (40, 48)).astype(np.uint8)
    as_png = data_uri(Image.fromarray(np.array(COLORS, np.uint8)[stored], "RGB"))
    inputs = {"prompt": "What is shown?", "max_new_tokens": 8, "adapter": "none"}
    palette = data_uri(palette_dicom(stored, 16), "application/dicom")
    assert answer(server, {**inputs, "image": palette}) == answer(server, {**inputs, "image": as_png})


HOSTILE = {
    "zero bytes": ("", r"is not a readable image \(it is empty: 0 bytes\)"),
    "truncated jpeg": ("truncated", r"is not a readable image"),
    "random bytes": (data_uri(np.random.default_rng(1).bytes(3000), "image/jpeg"), r"is not a readable image"),
    "pdf": (data_uri(b"%PDF-1.4\n%%EOF\n", "image/png"), r"is not a readable image \(it is a PDF document\)"),
    "zip": (data_uri(zip_bytes(), "image/png"), r"is not a readable image \(it is a zip archive\)"),
    "decompression bomb": (data_uri(png_header(60000, 60000)),
                           r"is 3600000000 pixels.*; the limit is 40000000 pixels per image "
                           r"\(IDEFICS_MAX_IMAGE_PIXELS\)"),
    "extreme aspect ratio": (data_uri(png_header(20000, 10)),
                             r"is 20000x10, an aspect ratio of 2000:1; the limit is 20:1 \(IDEFICS_MAX_ASPECT_RATIO\)"),
    "truncated dicom": (data_uri(dicom_bytes(ramp())[:-500], "application/dicom"),
                        r"is a DICOM file whose pixels cannot be decoded"),
    "unreadable dicom": (data_uri(b"\0" * 128 + b"DICM" + b"\xff" * 40, "application/dicom"),
                         r"is not a readable DICOM image"),
}


def hostile_uri(case: str) -> str:
    uri, _ = HOSTILE[case]
    if uri == "":
        return "data:image/png;base64,"
    if uri == "truncated":
        import io

        buffer = io.BytesIO()
        noise_image(3, (64, 64)).save(buffer, "JPEG")
        return data_uri(buffer.getvalue()[:400], "image/jpeg")
    return uri


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_fails_naming_the_input_and_the_server_keeps_serving(server, baseline, case):
    _, message = HOSTILE[case]
    # As `image`, and as the second of `images` (so the name is images[1]).
    for inputs, name in [({"image": hostile_uri(case)}, "image"),
                         ({"images": [BASELINE["image"], hostile_uri(case)], "prompt": "<image><image>"},
                          r"images\[1\]")]:
        result = server.predict({"max_new_tokens": 4, **inputs})
        assert result["status"] == "failed", result
        assert re.search(rf"\b{name}: .*{message}", result["error"]), result["error"]
        # Cog hands predict a temporary file (tmpb7b1i4aofile.png): its name must never reach the user.
        assert not re.search(r"tmp|/", result["error"]), result["error"]
    assert answer(server, BASELINE) == baseline
