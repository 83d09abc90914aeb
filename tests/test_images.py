import io

import numpy as np
import pytest
from PIL import Image

from idefics_cog.errors import InputError
from idefics_cog.images import check_count, image_inputs, load_image
from tests.helpers import noise_image


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
    with pytest.raises(InputError, match=r"images\[2\]: notes.png is not a readable image"):
        load_image("images[2]", path)


def test_truncated_file_is_refused(tmp_path):
    buffer = io.BytesIO()
    noise_image(0, (64, 64)).save(buffer, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[:300])
    with pytest.raises(InputError, match="image: cut.jpg is not a readable image"):
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
