import io

import numpy as np
import pytest
import torch
from PIL import Image

from idefics_cog.errors import InputError
from idefics_cog.inputs.images import Reduction, check_count, image_inputs, load_image
from tests.support.helpers import noise_image
from tests.support.images import dicom_bytes, load_bytes, png_header, ramp, row, zip_bytes


def test_image_comes_first_then_images(tmp_path):
    a, b, c = (tmp_path / n for n in "abc")
    assert image_inputs(a, [b, c]) == [("image", a), ("images[0]", b), ("images[1]", c)]
    assert image_inputs(None, [b]) == [("images[0]", b)]
    assert image_inputs(None, None) == []


def test_count_limit_names_the_inputs_and_the_limit():
    check_count(8, 8)
    with pytest.raises(InputError, match=r"image, images: 9 images given; the limit is 8"):
        check_count(9, 8)


def test_not_an_image_names_the_input(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is text, not pixels")
    with pytest.raises(InputError, match=r"images\[2\]: the file is not a readable image"):
        load_image("images[2]", path)


def test_truncated_file_is_refused(tmp_path):
    buffer = io.BytesIO()
    noise_image(0, (64, 64)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:300])
    with pytest.raises(InputError, match="image: the file is not a readable image"):
        load_image("image", path)


def test_transparency_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)  # fully transparent black
    path = tmp_path / "clear.png"
    Image.fromarray(pixels, "RGBA").save(path)
    image = load_image("image", path)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (255, 255, 255)


def test_grayscale_becomes_rgb(tmp_path):
    path = tmp_path / "gray.png"
    Image.new("L", (5, 5), 80).save(path)
    assert load_image("image", path).getpixel((2, 2)) == (80, 80, 80)


# --- Formats (DICOM: tests/inputs/test_dicom.py): high bit depth, palette, alpha, CMYK, WebP, GIF, EXIF -----------------------

@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path, fmt):
    path = tmp_path / f"ramp.{fmt.lower()}"
    Image.fromarray(ramp(top=65535), "I;16").save(path, fmt)
    assert Image.open(path).mode.startswith("I")
    values = row(load_image("image", path))
    assert values[0] == 0 and values[-1] == 255 and values == sorted(values) and len(set(values)) == 64


def test_12_bit_in_16_keeps_its_contrast(tmp_path):
    path = tmp_path / "twelve.png"
    Image.fromarray(ramp(top=4095), "I;16").save(path)
    values = row(load_image("image", path))
    assert values[0] == 0 and values[-1] == 255


def test_32_bit_integer_tiff(tmp_path):
    path = tmp_path / "int.tif"
    Image.fromarray(ramp(top=100000, dtype=np.int32), "I").save(path)
    values = row(load_image("image", path))
    assert values[0] == 0 and values[-1] == 255 and values == sorted(values)


def test_uniform_16_bit_image_keeps_its_level(tmp_path):
    path = tmp_path / "flat.png"
    Image.fromarray(np.full((4, 4), 65535, np.uint16), "I;16").save(path)
    assert load_image("image", path).getpixel((1, 1)) == (255, 255, 255)


def test_palette_with_and_without_transparency(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    image.save(tmp_path / "palette.png")
    assert load_image("image", tmp_path / "palette.png").getpixel((0, 0)) == (10, 20, 30)
    image.save(tmp_path / "clear.png", transparency=1)
    assert load_image("image", tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)


def test_gray_with_alpha_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 4, 2), np.uint8)
    pixels[..., 0], pixels[0, 0, 1] = 0, 255  # black; only the first pixel opaque
    Image.fromarray(pixels, "LA").save(tmp_path / "la.png")
    image = load_image("image", tmp_path / "la.png")
    assert image.getpixel((0, 0)) == (0, 0, 0) and image.getpixel((1, 1)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(tmp_path / "print.jpg", quality=100)
    red, green, blue = load_image("image", tmp_path / "print.jpg").getpixel((8, 8))
    assert red > 200 and green < 50 and blue < 50


def test_webp(tmp_path):
    Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "a.webp", lossless=True)
    assert load_image("image", tmp_path / "a.webp").getpixel((8, 8)) == (0, 0, 255)


def test_animated_gif_gives_its_first_frame(tmp_path, caplog):
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100)
    with caplog.at_level("INFO", logger="idefics_cog.inputs.images"):
        assert load_image("image", tmp_path / "anim.gif").getpixel((4, 4)) == (255, 0, 0)
    assert "the file has 3 frames; using the first" in caplog.text


def test_exif_orientation_is_applied(tmp_path):
    # Stored lying on its side: 20 wide, 10 high, white on the left half. Orientation 6 means "rotate 90 degrees
    # clockwise to view", so the upright image is 10 wide, 20 high, white on the top half.
    stored = Image.new("RGB", (20, 10), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    image = load_image("image", tmp_path / "phone.jpg")
    assert image.size == (10, 20)
    assert min(image.getpixel((5, 3))) > 200 and max(image.getpixel((5, 16))) < 50


def test_one_pixel_image_is_accepted(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "dot.png")
    assert load_image("image", tmp_path / "dot.png").getpixel((0, 0)) == (1, 2, 3)


# --- Hostile files -------------------------------------------------------------------------------------------


HOSTILE = {
    "zero bytes": (b"", "empty.png", r"the file is not a readable image \(it is empty: 0 bytes\)"),
    "random bytes": (np.random.default_rng(0).bytes(2000), "noise.jpg", r"the file is not a readable image"),
    "pdf": (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n%%EOF\n", "scan.png",
            r"the file is not a readable image \(it is a PDF document\)"),
    "zip": (zip_bytes(), "scan.jpg", r"the file is not a readable image \(it is a zip archive\)"),
    "decompression bomb": (png_header(60000, 60000), "bomb.png",
                           r"the file is (60000x60000 = )?3600000000 pixels.*; the limit is 40000000 pixels per image "
                           r"\(IDEFICS_MAX_IMAGE_PIXELS\)"),
    "extreme aspect ratio": (png_header(20000, 10), "strip.png",
                             r"the file is 20000x10, an aspect ratio of 2000:1; the limit is 20:1 "
                             r"\(IDEFICS_MAX_ASPECT_RATIO\)"),
    "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "x.png", r"the file is not a readable image"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_is_refused_naming_the_input(tmp_path, case):
    data, filename, message = HOSTILE[case]
    with pytest.raises(InputError, match=r"images\[3\]: " + message):
        load_bytes(tmp_path, data, filename, name="images[3]")


def test_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    def no_decoding(*args):
        raise AssertionError("decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    # Between Pillow's warning (1x the limit) and its error (2x): the explicit check on the header refuses it.
    with pytest.raises(InputError, match=r"image: the file is 8000x8000 = 64000000 pixels; the limit is 40000000 "
                                         r"pixels per image \(IDEFICS_MAX_IMAGE_PIXELS\)"):
        load_bytes(tmp_path, png_header(8000, 8000), "bomb.png")


def test_pillow_guard_also_fires(tmp_path):
    Image.new("RGB", (2, 2)).save(tmp_path / "ok.png")
    load_image("image", tmp_path / "ok.png")  # sets Pillow's limit to the one in use (40 megapixels by default)
    assert Image.MAX_IMAGE_PIXELS == 40_000_000
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(60000, 60000))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)


def test_limits_come_from_the_environment_at_call_time(tmp_path, monkeypatch):
    """Without `limits` (the tools, training data); the server passes the ones its Settings read at setup."""
    path = tmp_path / "a.png"
    Image.new("RGB", (300, 100)).save(path)
    assert load_image("image", path).size == (300, 100)
    monkeypatch.setenv("IDEFICS_MAX_IMAGE_PIXELS", "29999")
    with pytest.raises(InputError, match=r"image: the file is 300x100 = 30000 pixels; the limit is 29999 pixels"):
        load_image("image", path)
    monkeypatch.delenv("IDEFICS_MAX_IMAGE_PIXELS")
    monkeypatch.setenv("IDEFICS_MAX_ASPECT_RATIO", "2.5")
    with pytest.raises(InputError, match=r"aspect ratio of 3:1; the limit is 2.5:1 \(IDEFICS_MAX_ASPECT_RATIO\)"):
        load_image("image", path)
    monkeypatch.delenv("IDEFICS_MAX_ASPECT_RATIO")
    monkeypatch.setenv("IDEFICS_MAX_IMAGE_BYTES", str(path.stat().st_size - 1))
    with pytest.raises(InputError, match=rf"image: the file is {path.stat().st_size} bytes; the limit is "
                                         rf"{path.stat().st_size - 1} bytes per image \(IDEFICS_MAX_IMAGE_BYTES\)"):
        load_image("image", path)
    monkeypatch.setenv("IDEFICS_MAX_IMAGE_BYTES", "lots")
    with pytest.raises(ValueError, match="IDEFICS_MAX_IMAGE_BYTES='lots' is not a number"):
        load_image("image", path)


def test_default_byte_limit_is_50_mb(tmp_path):
    from idefics_cog.config import ImageLimits, Settings

    assert ImageLimits.from_env({}) == ImageLimits(40_000_000, 50_000_000, 20.0) == Settings.from_env({}).image_limits
    with pytest.raises(ValueError, match=r"IDEFICS_MAX_ASPECT_RATIO='-1' must be positive"):
        Settings.from_env({"IDEFICS_MAX_ASPECT_RATIO": "-1"})  # the server's setup stops, naming the variable
    path = tmp_path / "huge.png"
    with open(path, "wb") as file:  # sparse: 50 MB + 1 of zeros, never read
        file.truncate(50_000_001)
    with pytest.raises(InputError, match=r"the file is 50000001 bytes; the limit is 50000000 bytes"):
        load_image("image", path)


# --- Reduction right after decoding: the processor's pixel values are unchanged --------------------------------

@pytest.fixture(scope="module", params=[30, 224], ids=["tiny 30 px", "9b 224 px"])
def image_processor(request):
    from idefics_dev.tiny import build_processor

    return build_processor(request.param).image_processor


def sample_files(tmp_path) -> list:
    """Files of several formats, modes, sizes and aspect ratios (larger and smaller than the target)."""
    files = []

    def save(image: Image.Image, filename: str, **options):
        files.append(tmp_path / filename)
        image.save(files[-1], **options)

    save(noise_image(1, (640, 480)), "noise.png")
    save(noise_image(2, (97, 401)), "tall.jpg", quality=90)
    save(noise_image(3, (17, 11)), "small.png")
    save(Image.new("RGB", (1, 1), (1, 2, 3)), "dot.png")
    save(noise_image(4, (300, 300), "RGBA"), "alpha.png")
    save(Image.fromarray(ramp(top=65535), "I;16").resize((500, 260)), "sixteen.png")
    save(noise_image(5, (250, 250)).convert("P"), "palette.gif")
    save(noise_image(6, (333, 222)).convert("L"), "gray.webp", lossless=True)
    save(noise_image(7, (200, 120)).convert("CMYK"), "print.jpg")
    files.append(tmp_path / "scan.dcm")
    files[-1].write_bytes(dicom_bytes(np.tile(ramp(), (4, 2)), WindowCenter=2000, WindowWidth=3000))
    return files


@pytest.mark.slow
def test_reduced_images_give_the_processors_exact_pixel_values(tmp_path, image_processor):
    reduce = Reduction.of(image_processor)
    size = image_processor.image_size
    assert reduce == Reduction(size, size, int(Image.Resampling.BICUBIC))
    for path in sample_files(tmp_path):
        full, reduced = load_image("image", path), load_image("image", path, reduce=reduce)
        assert reduced.mode == "RGB" and reduced.size == (size, size), path.name
        before = image_processor([full], return_tensors="pt")
        after = image_processor([reduced], return_tensors="pt")
        assert torch.equal(before, after), path.name


def test_another_filter_would_change_the_pixel_values(tmp_path, image_processor):
    """The check above can fail: reducing with another filter first gives other pixel values."""
    full = load_image("image", sample_files(tmp_path)[0])
    size = image_processor.image_size
    other = full.resize((size, size), resample=Image.Resampling.LANCZOS)
    assert not torch.equal(image_processor([full], return_tensors="pt"), image_processor([other], return_tensors="pt"))


def test_no_reduction_for_a_processor_that_does_not_resize_to_a_fixed_size(image_processor):
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    assert Reduction.of(IdeficsImageProcessorPil(do_resize=False)) is None
    assert Reduction.of(IdeficsImageProcessorPil(size={"shortest_edge": 64})) is None


@pytest.mark.slow
def test_the_service_reduces_images_as_its_processor_would(engine, tmp_path):
    """What a request's job holds until the scheduler encodes it: image_size x image_size pictures whose pixel
    values are the ones the processor makes of the full-size file."""
    from idefics_cog.config import Settings
    from idefics_cog.serving.service import Service

    path = tmp_path / "big.png"
    noise_image(8, (1200, 900)).save(path)
    service = Service(engine, adapters=None, settings=Settings.from_env({}))
    [held] = service.read_images([("image", path)])
    processor = engine.processor.image_processor
    assert held.size == (processor.image_size, processor.image_size)
    full = load_image("image", path)
    assert torch.equal(processor([held], return_tensors="pt"), processor([full], return_tensors="pt"))
