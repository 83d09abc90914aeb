import io
import tarfile
import zipfile

import pytest

from idefics_cog.training.data import DatasetError, load_dataset
from idefics_cog.inputs.prompt import render
from tests.support.helpers import dataset_zip, png_bytes


def make_zip(path, lines, files=None, top=""):
    files = {"img/a.png": png_bytes(1), "img/b.png": png_bytes(2)} if files is None else files
    if top:
        files = {f"{top}{name}": data for name, data in files.items()}
    return dataset_zip(path, lines, files, data_name=f"{top}data.jsonl")


QA = {"images": ["img/a.png"], "question": "Is there a fracture?", "answer": "No."}
CHAT = {"images": ["img/a.png", "img/b.png"],
        "conversation": [{"user": "Compare <image> and <image>.", "assistant": "The second is brighter."},
                         {"user": "Any fracture?", "assistant": "No."}]}


def test_both_line_shapes_load_and_answers_are_the_only_spans(tmp_path):
    qa, chat = load_dataset(make_zip(tmp_path / "d.zip", [QA, "", CHAT]), tmp_path / "extracted")
    assert qa.line == 1 and chat.line == 3 and len(chat.images) == 2
    assert [im.size for im in chat.load_images()] == [(48, 40), (48, 40)]
    segments, spans = chat.transcript()
    text = render(segments)
    assert [text[a:b] for a, b in spans] == ["The second is brighter.<end_of_utterance>", "No.<end_of_utterance>"]
    assert text.startswith("User: Compare<fake_token_around_image><image>")  # the placeholders bind the images
    assert "\nUser: Any fracture?<end_of_utterance>\nAssistant: No." in text


def test_evaluation_prompt_ends_with_the_assistant_turn(tmp_path):
    (qa,) = load_dataset(make_zip(tmp_path / "d.zip", [QA]), tmp_path / "extracted")
    segments, spans = qa.transcript(answer_last=False)
    assert render(segments).endswith("<end_of_utterance>\nAssistant:") and spans == []
    assert segments == ["User: Is there a fracture?", 0, "<end_of_utterance>", "\nAssistant:"]


def test_a_tar_with_a_top_level_folder_works(tmp_path):
    source = make_zip(tmp_path / "d.zip", [QA])
    with zipfile.ZipFile(source) as archive, tarfile.open(tmp_path / "d.tar.gz", "w:gz") as tar:
        for name in archive.namelist():
            data = archive.read(name)
            info = tarfile.TarInfo(f"mydata/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert len(load_dataset(tmp_path / "d.tar.gz", tmp_path / "extracted")) == 1


BAD = {
    "bad json": ([QA, "{not json"], r"data.jsonl line 2: not valid JSON"),
    "missing image": ([QA, {**QA, "images": ["img/zzz.png"]}], r"data.jsonl line 2: image 'img/zzz.png' is not in"),
    "escaping path": ([{**QA, "images": ["../etc/passwd"]}], r"data.jsonl line 1: image path '../etc/passwd' must stay"),
    "no answer": ([{"images": [], "question": "x"}], r"data.jsonl line 1: needs \"question\" and \"answer\""),
    "bad conversation": ([{"images": [], "conversation": []}], r"data.jsonl line 1: conversation must be"),
    "placeholders": ([{**QA, "question": "<image> <image>"}], r"data.jsonl line 1: prompt: has 2 <image>"),
    "empty": ([""], r"data.jsonl: no examples"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_fails_with_file_and_line(tmp_path, case):
    lines, message = BAD[case]
    with pytest.raises(DatasetError, match=message):
        load_dataset(make_zip(tmp_path / "d.zip", lines), tmp_path / "extracted")


def test_archive_without_data_file(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as archive:
        archive.writestr("other.txt", "hello")
    with pytest.raises(DatasetError, match="no data.jsonl at the root"):
        load_dataset(tmp_path / "d.zip", tmp_path / "extracted")


def test_unsafe_archive_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.zip", "w") as archive:
        archive.writestr("../evil.txt", "x")
    with pytest.raises(DatasetError, match="evil.txt"):
        load_dataset(tmp_path / "d.zip", tmp_path / "extracted")


def test_unreadable_image_is_reported_with_its_line(tmp_path):
    archive = make_zip(tmp_path / "d.zip", [QA], files={"img/a.png": b"not a png"})
    (example,) = load_dataset(archive, tmp_path / "extracted")
    with pytest.raises(Exception, match=r"data.jsonl line 1: a.png"):
        example.load_images()
