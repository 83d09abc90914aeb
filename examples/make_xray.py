"""Draws examples/xray.png: a synthetic chest radiograph (no patient data), used by `make predict` and the README.

Run: .venv/bin/python examples/make_xray.py
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SIZE = 384


def chest_radiograph(size: int = SIZE, seed: int = 7) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 6) - (((y - 0.55) / 0.55) ** 6))  # soft tissue: bright torso
    lungs = sum(np.exp(-(((x - cx) / 0.15) ** 2) - (((y - 0.48) / 0.28) ** 2)) for cx in (0.32, 0.68))
    heart = np.exp(-(((x - 0.56) / 0.12) ** 2) - (((y - 0.62) / 0.12) ** 2))
    spine = np.exp(-(((x - 0.5) / 0.035) ** 2)) * (y > 0.1)
    ribs = np.zeros_like(x)
    for k in range(9):  # arcs curving down and out from the spine, on both sides
        level = 0.22 + 0.065 * k
        arc = level + 0.16 * ((x - 0.5) / 0.4) ** 2
        ribs += np.exp(-(((y - arc) / 0.012) ** 2)) * (np.abs(x - 0.5) > 0.05) * (np.abs(x - 0.5) < 0.4)
    clavicles = np.exp(-(((y - 0.17 - 0.1 * np.abs(x - 0.5)) / 0.012) ** 2)) * (np.abs(x - 0.5) < 0.3)
    image = 0.55 * body - 0.45 * lungs + 0.35 * heart + 0.5 * spine + 0.25 * ribs + 0.35 * clavicles
    image += np.random.default_rng(seed).normal(0, 0.02, image.shape)  # film grain
    image = np.clip((image - image.min()) / (image.max() - image.min()), 0, 1)
    picture = Image.fromarray((255 * image).astype(np.uint8), mode="L")
    return picture.filter(ImageFilter.GaussianBlur(1.2))


if __name__ == "__main__":
    out = Path(__file__).with_name("xray.png")
    chest_radiograph().save(out, optimize=True)
    print(out)
