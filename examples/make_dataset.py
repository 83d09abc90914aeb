"""Writes examples/data.zip: a small training set in `cog train`'s format (data.jsonl and its images), made from
examples/xray.png, for `make train` and the README's fine-tuning commands. Synthetic: no patient data.

Run: .venv/bin/python examples/make_dataset.py [OUT.zip]
"""

import io
import json
import sys
import zipfile
from pathlib import Path

from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent


def views(xray: Image.Image) -> dict[str, Image.Image]:
    """A few distinct pictures from the one radiograph: as it is, mirrored, darker, a crop of each lung."""
    width, height = xray.size
    return {
        "img/chest.png": xray,
        "img/mirrored.png": ImageOps.mirror(xray),
        "img/dark.png": xray.point(lambda value: value // 2),
        "img/left.png": xray.crop((0, 0, width // 2, height)),
        "img/right.png": xray.crop((width // 2, 0, width, height)),
    }


LINES = [
    {"images": ["img/chest.png"], "question": "What does this X-ray show?", "answer": "A frontal chest radiograph."},
    {"images": ["img/chest.png"], "question": "Is there a fracture?", "answer": "No fracture is visible."},
    {"images": ["img/mirrored.png"], "question": "Where is the heart?", "answer": "Left of the midline."},
    {"images": ["img/dark.png"], "question": "Is the exposure adequate?", "answer": "No, it is underexposed."},
    {"images": ["img/left.png"], "question": "Which part is shown?", "answer": "The right lung field."},
    {"images": ["img/right.png"], "question": "Which part is shown?", "answer": "The left lung field."},
    {"images": ["img/chest.png", "img/dark.png"],
     "conversation": [{"user": "Compare <image> with <image>.", "assistant": "The second is darker."},
                      {"user": "Same patient?", "assistant": "Yes, the same radiograph."}]},
    {"images": ["img/chest.png"],
     "conversation": [{"user": "What is shown?", "assistant": "A chest X-ray."},
                      {"user": "Is it normal?", "assistant": "It looks normal."}]},
]


def write(out: Path) -> Path:
    xray = Image.open(HERE / "xray.png").convert("L")
    with zipfile.ZipFile(out, "w") as archive:
        for name, picture in views(xray).items():
            buffer = io.BytesIO()
            picture.save(buffer, "PNG")
            archive.writestr(name, buffer.getvalue())
        archive.writestr("data.jsonl", "".join(json.dumps(line) + "\n" for line in LINES))
    return out


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "data.zip"))
