"""What `evaluate` reads (evaluation/datasets.py): parquet in the hub's PathVQA/VQA-RAD layout (a file or a folder),
and the training archive; the candidates each question gets."""

import json

import pytest

from idefics_cog.evaluation import datasets
from idefics_cog.training.data import DatasetError
from tests.evaluation.conftest import IMAGES, PARQUET_ROWS, write_parquet
from tests.support.helpers import dataset_zip, png_bytes


def test_a_folder_of_parquet_files_is_read_in_name_order_with_its_images(dataset, tmp_path):
    items = datasets.load(dataset / "path-vqa", tmp_path)  # data/ below it: found recursively
    assert [(i.question, i.reference) for i in items] == [(q, a) for q, a, _ in PARQUET_ROWS]
    assert [i.where for i in items] == ["test-00000-of-00002.parquet row 1", "test-00000-of-00002.parquet row 2",
                                        "test-00001-of-00002.parquet row 1"]
    assert [[p.read_bytes() for p in i.example.images] for i in items] == [[image] for _, _, image in PARQUET_ROWS]
    assert items[1].example.load_images()[0].size == (48, 40)
    segments, _ = items[0].example.transcript(answer_last=False)  # the same prompt as an archive's example
    assert segments[-1].endswith("\nAssistant:") and 0 in segments
    assert [i.choices(("yes", "no")) for i in items] == [("yes", "no"), ("yes", "no"), ()]


def test_one_parquet_file_and_a_limit_read_only_the_first_rows(dataset, tmp_path):
    file = dataset / "path-vqa" / "data" / "test-00000-of-00002.parquet"
    assert [i.question for i in datasets.load(file, tmp_path, limit=1)] == ["Is there a fracture?"]
    assert len(list(tmp_path.iterdir())) == 1  # the second row's image was never written


def test_the_archive_gives_the_same_questions_and_its_own_choices(tmp_path):
    lines = [{"images": ["a.png"], "question": "Which side?", "answer": "left", "choices": ["left", "right"]},
             {"images": ["a.png"], "question": "Is it broken?", "answer": "No."},
             {"images": [], "question": "Name the bone.", "answer": "femur"}]
    archive = dataset_zip(tmp_path / "d.zip", lines, {"a.png": IMAGES["img/a.png"]})
    items = datasets.load(archive, tmp_path / "x")
    assert [i.where for i in items] == ["data.jsonl line 1", "data.jsonl line 2", "data.jsonl line 3"]
    assert [i.choices(("yes", "no")) for i in items] == [("left", "right"), ("yes", "no"), ()]
    assert [i.choices(()) for i in items] == [(), (), ()]  # --choices none


def test_parquet_options_column_and_an_image_by_path(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(png_bytes(5))
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    pq.write_table(pa.table({"image": pa.array([{"bytes": None, "path": "images/x.png"}], type=image_type),
                             "question": ["Which stain?"], "answer": ["H&E"], "options": [["H&E", "PAS", "Gram"]]}),
                   tmp_path / "t.parquet")
    [item] = datasets.load(tmp_path / "t.parquet", tmp_path / "work")
    assert item.example.images[0].read_bytes() == png_bytes(5)
    assert item.choices(("yes", "no")) == ("H&E", "PAS", "Gram")


@pytest.mark.parametrize("change, message", [
    ({"drop": "answer"}, "t.parquet has no column answer (it needs image, question, answer; it has image, question)"),
    ({"image": {"bytes": None, "path": "missing.png"}}, "t.parquet row 1: image path 'missing.png' is not a file"),
    ({"image": {"bytes": None, "path": None}}, "t.parquet row 1: the image has neither bytes nor a path"),
    ({"choices": [["only one"]]}, "t.parquet row 1: choices: give at least 2 candidates"),
    ({"choices": [["left", " left "]]}, "t.parquet row 1: choices: 'left' is given twice (items 1 and 2)"),
    ({"question": "<image> and <image>?"}, "t.parquet row 1: prompt: has 2 <image> placeholder(s) but 1 image(s)"),
])
def test_a_bad_parquet_row_names_the_file_and_row(tmp_path, change, message):
    import pyarrow as pa
    import pyarrow.parquet as pq

    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    columns = {"image": pa.array([change.get("image", {"bytes": png_bytes(1), "path": "a.png"})], type=image_type),
               "question": [change.get("question", "Is it?")], "answer": ["yes"]}
    if "choices" in change:
        columns["choices"] = change["choices"]
    columns.pop(change.get("drop", "-"), None)
    pq.write_table(pa.table(columns), tmp_path / "t.parquet")
    with pytest.raises(DatasetError) as error:
        datasets.load(tmp_path / "t.parquet", tmp_path / "work")
    assert message in str(error.value)


def test_what_is_not_a_dataset_says_so(tmp_path):
    with pytest.raises(DatasetError, match="no .parquet files in the folder"):
        datasets.load(tmp_path, tmp_path)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match="bad.parquet is not a readable parquet file"):
        datasets.load(tmp_path / "bad.parquet", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.load(tmp_path / "nothing.zip", tmp_path)
    write_parquet(tmp_path / "empty.parquet", [])
    with pytest.raises(DatasetError, match="holds no questions"):
        datasets.load(tmp_path / "empty.parquet", tmp_path)


def test_archive_choices_must_be_texts(tmp_path):
    lines = [{"images": [], "question": "Which side?", "answer": "left", "choices": "left,right"}]
    with pytest.raises(DatasetError, match=r"data.jsonl line 1: choices must be a list of texts"):
        datasets.load(dataset_zip(tmp_path / "d.zip", lines, {}), tmp_path / "x")
    assert json.loads(json.dumps(lines))  # (the line itself is valid JSON: only `choices` is wrong)


def test_a_parquet_image_path_outside_its_folder_is_refused(tmp_path):
    """A downloaded dataset names no file of this machine (with --endpoint it would be sent away as an image)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "data").mkdir()
    (tmp_path / "secret.png").write_bytes(png_bytes(1))
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for name in ["../secret.png", str(tmp_path / "secret.png")]:
        table = pa.table({"image": pa.array([{"bytes": None, "path": name}], type=image_type),
                          "question": ["Is there a fracture?"], "answer": ["no"]})
        pq.write_table(table, tmp_path / "data" / "t.parquet")
        with pytest.raises(DatasetError, match=r"t.parquet row 1: image path .* is outside the parquet file's folder"):
            datasets.load(tmp_path / "data" / "t.parquet", tmp_path / "work")
