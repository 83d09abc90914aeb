"""Datasets for the evaluation tests: a PathVQA-layout parquet file written here with pyarrow (as the hub publishes
PathVQA and VQA-RAD: `image` a struct {bytes, path}, `question`, `answer`), and the same questions as a training-format
archive."""

import json
import zipfile

import pytest

from tests.support.helpers import png_bytes

# Two closed questions, an open one, a two-turn chat (archive only), and a question too long for the tiny model's
# context of 512 tokens.
LINES = [
    {"images": ["img/a.png"], "question": "Is there a fracture?", "answer": "No."},
    {"images": ["img/b.png"], "question": "Is the lung clear?", "answer": "yes"},
    {"images": ["img/a.png"], "question": "Which organ is shown?", "answer": "The left lung"},
    {"images": ["img/a.png", "img/b.png"],
     "conversation": [{"user": "Compare <image> and <image>.", "assistant": "The second is brighter."},
                      {"user": "Where is the lesion?", "assistant": "In the right upper lobe."}]},
    {"images": ["img/a.png"], "question": "Describe: " + "lung " * 600, "answer": "x"},
]
IMAGES = {"img/a.png": png_bytes(1), "img/b.png": png_bytes(2)}


def write_parquet(path, rows: list[dict], **columns) -> None:
    """`rows`: (question, answer, image bytes or None); `columns`: more columns, one value per row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = {"image": [None if image is None else {"bytes": image, "path": f"{i}.png"}
                       for i, (_, _, image) in enumerate(rows)],
             "question": [q for q, _, _ in rows], "answer": [a for _, a, _ in rows], **columns}
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    arrays = {name: pa.array(values, type=image_type if name == "image" else None) for name, values in table.items()}
    pq.write_table(pa.table(arrays), path)


PARQUET_ROWS = [("Is there a fracture?", "no", IMAGES["img/a.png"]), ("Is the lung clear?", "yes", IMAGES["img/b.png"]),
                ("Which organ is shown?", "the left lung", IMAGES["img/a.png"])]


@pytest.fixture(scope="package")
def dataset(tmp_path_factory):
    """data.zip and data.tar.gz (LINES), and path-vqa/data/test-0000{0,1}.parquet (PARQUET_ROWS, split in two)."""
    from tests.support.helpers import tar_bytes

    folder = tmp_path_factory.mktemp("dataset")
    for name, data in IMAGES.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(data)
    (folder / "data.jsonl").write_text("\n".join(json.dumps(line) for line in LINES) + "\n")
    with zipfile.ZipFile(folder / "data.zip", "w") as archive:
        for name in ["data.jsonl", *IMAGES]:
            archive.write(folder / name, name)
    (folder / "data.tar.gz").write_bytes(tar_bytes(folder, top="mydata"))  # all of it, the zip included
    parquet = folder / "path-vqa" / "data"
    parquet.mkdir(parents=True)
    write_parquet(parquet / "test-00000-of-00002.parquet", PARQUET_ROWS[:2])
    write_parquet(parquet / "test-00001-of-00002.parquet", PARQUET_ROWS[2:])
    return folder


MAX_NEW_TOKENS = 8


@pytest.fixture(scope="package")
def expected(tiny_dir, dataset, tmp_path_factory):
    """data.zip evaluated in this process on one engine, closed questions scored by choices too: the base alone,
    the tiny adapter as `medical`, and the same adapter named as a local directory in lora_weights.
    ({label: predictions}, results)."""
    from idefics_cog.evaluation import datasets, local
    from idefics_cog.evaluation.configuration import Configuration
    from idefics_cog.serving.adapters import Adapters
    from idefics_cog.serving.engine import Engine

    engine = Engine.load(tiny_dir / "base", "cpu")
    adapters = Adapters(engine, tmp_path_factory.mktemp("cache"))
    adapters.load_default(str(tiny_dir / "adapter"))
    items = datasets.load(dataset / "data.zip", tmp_path_factory.mktemp("extracted"))
    configs = [Configuration("none"), Configuration("medical"), Configuration(lora_weights=str(tiny_dir / "adapter"))]
    results = local.evaluate(engine, adapters, items, configs, MAX_NEW_TOKENS)
    return {r["label"]: [p["prediction"] for p in r["predictions"]] for r in results}, results
