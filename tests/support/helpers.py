"""Small shared helpers for the tests: synthetic images and data URIs."""

import base64
import io
from pathlib import Path

import numpy as np
from PIL import Image


def noise_image(seed: int, size: tuple[int, int] = (48, 40), mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


def save_png(image: Image.Image, path: Path) -> Path:
    image.save(path, "PNG")
    return path


def data_uri(image_or_bytes, mime: str = "image/png") -> str:
    if isinstance(image_or_bytes, Image.Image):
        buffer = io.BytesIO()
        image_or_bytes.save(buffer, "PNG")
        image_or_bytes = buffer.getvalue()
    return f"data:{mime};base64,{base64.b64encode(image_or_bytes).decode()}"


def tar_bytes(folder: Path, top: str | None = None) -> bytes:
    """A .tar.gz of `folder`'s files (under a top-level directory `top` when given)."""
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=f"{top}/{path.name}" if top else path.name)
    return buffer.getvalue()


ANSWERS = ["yes", "no", "a chest x-ray"]


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise_image(seed).save(buffer, "PNG")
    return buffer.getvalue()


def vqa_lines(count: int = 10) -> tuple[list[dict], dict[str, bytes]]:
    """A synthetic dataset in the training format: data.jsonl lines (single questions and two-turn conversations,
    one or two images each, short answers) and the image files they name."""
    lines, files = [], {}
    for i in range(count):
        images = [f"img/{i}.png"] + ([f"img/{i}b.png"] if i % 3 == 0 else [])
        for n, name in enumerate(images):
            files[name] = png_bytes(100 + 10 * i + n)
        if i % 4 == 1:
            lines.append({"images": images, "conversation": [
                {"user": "What is shown?", "assistant": "a chest x-ray"},
                {"user": "Is it normal?", "assistant": ANSWERS[i % 2]}]})
        else:
            lines.append({"images": images, "question": "Is there a fracture?", "answer": ANSWERS[i % 3]})
    return lines, files


def dataset_zip(path: Path, lines: list, files: dict[str, bytes], raw_jsonl: str | None = None,
                data_name: str = "data.jsonl") -> Path:
    """A dataset archive: the files, and data.jsonl made of `lines` (dicts, or strings written as they are)."""
    import json
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        if data_name:
            text = raw_jsonl if raw_jsonl is not None else "".join(
                (line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
            archive.writestr(data_name, text)
    return path


def logged_new_tokens(log_text: str, prediction_id: str) -> int | None:
    """The new tokens one prediction generated, from the Cog server's log (coglet's JSON lines): its own line, or,
    for a cancelled prediction whose count was logged after coglet let it go, the first line without any
    prediction id after it started. 0 for "no token generated"; None while there is none."""
    import re

    started = False
    for line in log_text.splitlines():
        if prediction_id in line and "Starting prediction" in line:
            started = True
        elif started and ("new tokens" in line or "no token generated" in line) and (
                prediction_id in line or '"prediction_id"' not in line):
            found = re.search(r"(\d+) new tokens", line)
            return int(found.group(1)) if found else 0
    return None


def new_tokens_of(server, prediction_id: str, wait: float = 30) -> int | None:
    """The new tokens one prediction generated, from the server's log, once its count is there (logged when its
    generation ends); None if none is within `wait` seconds."""
    import time

    deadline = time.monotonic() + wait
    while True:
        tokens = logged_new_tokens(server.log_path.read_text(errors="replace"), prediction_id)
        if tokens is not None or time.monotonic() > deadline:
            return tokens
        time.sleep(0.2)


def negated_adapter(adapter: Path, folder: Path) -> Path:
    """A second adapter for the tiny model: `adapter` with its B matrices negated, written to `folder`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, folder)
    weights = folder / "adapter_model.safetensors"
    save_file({k: -v if "lora_B" in k else v for k, v in load_file(weights).items()}, weights)
    return folder


def answer(server, inputs: dict) -> str:
    """The text of a prediction that must succeed, sent alone."""
    result = server.predict(inputs)
    assert result["status"] == "succeeded", result.get("error")
    return "".join(result["output"] or [])


def bin_adapter(adapter: Path, folder: Path, extra: dict | None = None) -> Path:
    """`adapter` as PEFT's older format publishes it: adapter_config.json and a torch.save'd adapter_model.bin
    (its tensors, and `extra` entries beside them)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    folder.mkdir(parents=True)
    shutil.copy(adapter / "adapter_config.json", folder)
    torch.save({**load_file(adapter / "adapter_model.safetensors"), **(extra or {})}, folder / "adapter_model.bin")
    return folder


class Hostile:
    """Unpickling this opens (creates) `marker` for writing: the proof that a pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def hostile_adapter(adapter: Path, folder: Path, marker: Path, torch_format: bool = True) -> Path:
    """An adapter whose adapter_model.bin would create `marker` if it were unpickled by plain pickle: among the
    genuine LoRA tensors (torch.save's zip format), or alone (a bare pickle stream)."""
    import pickle

    if torch_format:
        return bin_adapter(adapter, folder, {"payload": Hostile(marker)})
    bin_adapter(adapter, folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(Hostile(marker), protocol=2))  # torch's default
    return folder


def adapter_with_config(adapter: Path, folder: Path, **changes) -> Path:
    """A copy of `adapter` in `folder` whose adapter_config.json has `changes` applied."""
    return adapter_copy(adapter, folder, changes)


def adapter_copy(adapter: Path, folder: Path, config: dict | None = None, tensors=None) -> Path:
    """A copy of `adapter` in `folder` with `config` merged into its adapter_config.json and its tensors replaced by
    `tensors(tensors)`."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, folder)
    if config:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors is not None:
        path = folder / "adapter_model.safetensors"
        save_file(tensors(load_file(path)), path)
    return folder

