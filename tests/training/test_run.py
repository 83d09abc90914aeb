"""Training LoRA adapters (`cog train`): labels, batching, a short real training on the tiny model on CPU, the
adapter it makes (through plain PEFT and the real Cog server), script/train, and bad datasets."""

import io
import json
import os
import re
import subprocess
import tarfile

import pytest
import requests
import torch
from peft import PeftModel
from transformers import IdeficsForVisionText2Text

from idefics_cog.adapters.checks import check_adapter, layer_shapes
from idefics_cog.training.data import DatasetError, load_dataset
from idefics_cog.serving.engine import Engine
from idefics_cog.serving.jobs import Sampling
from idefics_cog.errors import InputError
from idefics_cog.inputs.prompt import END_OF_UTTERANCE, encode
from idefics_cog.config import ROOT
from idefics_cog.model.tokenizer import load_processor
from idefics_cog.training.collator import Collator, causal_lm_loss
from idefics_cog.training.examples import IGNORE, ExampleDataset, prepare
from idefics_cog.training.packing import ADAPTER_FILES
from idefics_cog.training.run import TrainConfig, TrainingCancelled, split, train_adapter
from tests.conftest import tiny_env
from tests.support.fileserver import FileServer
from tests.support.helpers import png_bytes, vqa_lines
from tests.support.helpers import dataset_zip as make_zip

pytestmark = pytest.mark.slow  # make test-fast leaves it out

@pytest.fixture(scope="module")
def dataset_zip(tmp_path_factory):
    return make_zip(tmp_path_factory.mktemp("data") / "data.zip", *vqa_lines())


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(tiny_dir / "base")


@pytest.fixture(scope="module")
def examples(dataset_zip, tmp_path_factory):
    return load_dataset(dataset_zip, tmp_path_factory.mktemp("extracted"))


def labelled_runs(ids: torch.Tensor, labels: torch.Tensor, tokenizer) -> list[str]:
    """The decoded text of each run of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(ids.tolist(), labels.tolist()):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run).strip() for run in runs]


# --- (a) labels and batches --------------------------------------------------------------------------------------


def test_only_the_answers_and_their_end_of_utterance_are_labelled(examples, processor):
    tokenizer = processor.tokenizer
    for example in examples:
        item = prepare(example, processor, 512)
        segments, _ = example.transcript()
        # The very tokens predict.py's encoder makes for this transcript.
        assert torch.equal(item.input_ids, encode(segments, example.load_images(), processor).input_ids[0])
        expected = [turn.assistant + END_OF_UTTERANCE for turn in example.turns]
        assert labelled_runs(item.input_ids, item.labels, tokenizer) == expected
        unlabelled = tokenizer.decode(item.input_ids[item.labels == IGNORE])
        assert unlabelled.startswith("<s>User:") and unlabelled.count("<image>") == len(example.images)
        assert unlabelled.count("Assistant:") == len(example.turns)
    two_turns = next(e for e in examples if len(e.turns) == 2 and len(e.images) == 2)
    assert labelled_runs(*[getattr(prepare(two_turns, processor, 512), k) for k in ("input_ids", "labels")],
                         tokenizer) == ["a chest x-ray<end_of_utterance>", "no<end_of_utterance>"]


def test_a_batch_of_two_pads_tokens_and_images_and_keeps_each_row_exact(examples, processor, engine):
    one = next(i for i, e in enumerate(examples) if len(e.images) == 1 and len(e.turns) == 1)
    two = next(i for i, e in enumerate(examples) if len(e.images) == 2 and len(e.turns) == 2)
    dataset = ExampleDataset([prepare(examples[i], processor, 512) for i in (one, two)], processor)
    rows = [dataset[0], dataset[1]]
    assert rows[0]["input_ids"].shape[0] < rows[1]["input_ids"].shape[0]
    batch = Collator(processor.tokenizer.pad_token_id)(rows)
    length, short = rows[1]["input_ids"].shape[0], rows[0]["input_ids"].shape[0]
    assert batch["input_ids"].shape == (2, length) and batch["pixel_values"].shape[:2] == (2, 2)
    assert batch["image_attention_mask"].shape == (2, length, 2)
    assert (batch["labels"][0, short:] == IGNORE).all() and (batch["attention_mask"][0, short:] == 0).all()
    assert (batch["pixel_values"][0, 1] == 0).all() and (batch["image_attention_mask"][0, :, 1] == 0).all()
    # Right padding and the blank second image change nothing for the shorter row: same logits, same loss.
    model = engine.model
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        padded = model(**inputs).logits
        alone = model(**{k: v[:1, :short, ...] if k != "pixel_values" else v[:1, :1]
                         for k, v in inputs.items() if k != "image_attention_mask"},
                      image_attention_mask=inputs["image_attention_mask"][:1, :short, :1]).logits
    torch.testing.assert_close(padded[0, :short], alone[0], atol=1e-4, rtol=1e-4)
    loss = causal_lm_loss({"logits": padded}, batch["labels"])
    labels = batch["labels"][:, 1:]
    manual = torch.nn.functional.cross_entropy(padded[:, :-1][labels != IGNORE], labels[labels != IGNORE])
    torch.testing.assert_close(loss, manual)
    # With the count of labelled tokens of the accumulated batch, the sum is divided by it.
    torch.testing.assert_close(causal_lm_loss({"logits": padded}, batch["labels"], 2 * int((labels != IGNORE).sum())),
                               manual / 2)


def test_validation_split_is_seeded_and_never_leaves_training_empty(caplog):
    items = list(range(10))
    train, held = split(items, 0.2, seed=3)
    assert len(held) == 2 and sorted(train + held) == items and split(items, 0.2, seed=3) == (train, held)
    assert split(items, 0.0, seed=3) == (items, [])
    assert split(items, 0.01, seed=3)[1]  # any fraction above 0 holds out at least one
    with caplog.at_level("INFO", logger="idefics_cog.training.run"):
        assert split([7], 0.5, seed=3) == ([7], [])
    assert "no split" in caplog.text


# --- (b) a short training ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(dataset_zip, tiny_dir, tmp_path_factory):
    config = TrainConfig(max_steps=30, learning_rate=1e-2, batch_size=2, validation_fraction=0.2, seed=7,
                         device="cpu")
    return train_adapter(dataset_zip, str(tiny_dir / "base"), ROOT / "weights", config,
                         tmp_path_factory.mktemp("trained"))


def greedy(engine, example) -> str:
    segments, _ = example.transcript(answer_last=False)
    encoded = encode(segments, example.load_images(), engine.processor)
    return "".join(engine.stream(encoded, Sampling(max_new_tokens=8)))


def test_training_lowers_the_loss_and_changes_the_answers(trained, examples, engine):
    assert trained.train_examples == 8 and trained.validation_examples == 2
    assert len(trained.losses) == 30 and trained.losses[0] > trained.losses[-1]
    assert trained.eval_losses and trained.eval_losses[-1] < trained.eval_losses[0]
    tuned = Engine(trained.model, trained.processor, torch.device("cpu"))
    before = [greedy(engine, e) for e in examples]
    after = [greedy(tuned, e) for e in examples]
    assert before != after
    right = lambda answers: sum(a.strip() == e.turns[-1].assistant for a, e in zip(answers, examples))
    assert right(after) > right(before)


def test_the_training_logs_step_loss_learning_rate_speed_and_validation(dataset_zip, tiny_dir, tmp_path, caplog):
    config = TrainConfig(max_steps=2, batch_size=1, validation_fraction=0.2, device="cpu")
    with caplog.at_level("INFO", logger="idefics_cog.training"):
        train_adapter(dataset_zip, str(tiny_dir / "base"), ROOT / "weights", config, tmp_path)
    assert re.search(r"step 1/2 .*loss \d+\.\d+ +learning rate [\d.e-]+ +[\d.]+ samples/s", caplog.text)
    assert re.search(r"step 2/2 +validation loss \d+\.\d+", caplog.text)  # max_steps ended mid-epoch: still one
    assert "training on 8 examples" in caplog.text


def test_a_cancelled_training_stops_after_its_current_step_and_writes_nothing(dataset_zip, tiny_dir, tmp_path):
    import threading

    stop = threading.Event()
    stop.set()  # cancelled before its first step ends
    config = TrainConfig(max_steps=200, batch_size=1, validation_fraction=0.0, device="cpu")
    with pytest.raises(TrainingCancelled, match=r"after step 1$"):
        train_adapter(dataset_zip, str(tiny_dir / "base"), ROOT / "weights", config, tmp_path, stop)
    assert not (tmp_path / "lora.tar").exists()


# --- (c) the adapter ---------------------------------------------------------------------------------------------


def test_the_tar_is_a_standard_peft_adapter_that_plain_peft_loads(trained, tiny_dir, examples, tmp_path):
    with tarfile.open(trained.tar_path) as tar:
        assert sorted(tar.getnames()) == sorted(ADAPTER_FILES)
        tar.extractall(tmp_path, filter="data")
    base = IdeficsForVisionText2Text.from_pretrained(tiny_dir / "base")
    config = check_adapter(tmp_path, layer_shapes(base))  # its target_modules: the exact layers the file adapts
    kinds = {name.rpartition(".")[2] for name in config.target_modules}
    assert (config.r, config.lora_alpha, kinds) == (16, 32, {"q_proj", "k_proj", "v_proj"})
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(raw["target_modules"]) == {"q_proj", "k_proj", "v_proj"}
    assert json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_dir / "base")
    loaded = Engine(PeftModel.from_pretrained(base, tmp_path).eval(), trained.processor, torch.device("cpu"))
    tuned = Engine(trained.model, trained.processor, torch.device("cpu"))
    assert [greedy(loaded, e) for e in examples[:4]] == [greedy(tuned, e) for e in examples[:4]]


def test_the_trained_tar_works_as_lora_weights_through_the_cog_server(trained, server, examples):
    example = next(e for e in examples if len(e.turns) == 1 and len(e.images) == 1)
    tuned = Engine(trained.model, trained.processor, torch.device("cpu"))
    from tests.support.helpers import data_uri

    request = {"prompt": example.turns[0].user, "image": data_uri(example.load_images()[0]), "max_new_tokens": 8}
    with FileServer() as files:
        url = files.add("/trained.tar", trained.tar_path.read_bytes())
        result = server.predict({**request, "lora_weights": url})
        assert result["status"] == "succeeded", result.get("error")
        assert "".join(result["output"]) == greedy(tuned, example)
        baseline = server.predict({**request, "adapter": "none"})
    assert "".join(baseline["output"]) != "".join(result["output"])


# --- (d) script/train through the real server in train mode ------------------------------------------------------


def script_train(tmp_path, tiny_dir, dataset, *inputs):
    env = {**os.environ, **tiny_env(tiny_dir), "IDEFICS_ADAPTER_WEIGHTS": "none", "IDEFICS_DEVICE": "cpu"}
    out = tmp_path / "out" / "weights.tar"
    result = subprocess.run([str(ROOT / "script/train"), "-i", f"dataset=@{dataset}", *inputs, "-o", str(out)],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    return result, out


@pytest.mark.server
def test_script_train_shows_its_log_while_it_runs_and_writes_the_adapter_tar(tmp_path, tiny_dir, dataset_zip):
    """The training's first log line reaches the terminal while the training still runs: the server, given one slot,
    reports BUSY then (before, every line came at once, once the training had ended). The .tar it writes is the
    adapter."""
    env = {**os.environ, **tiny_env(tiny_dir), "IDEFICS_ADAPTER_WEIGHTS": "none", "IDEFICS_DEVICE": "cpu",
           "COG_MAX_CONCURRENCY": "1"}
    out = tmp_path / "out" / "weights.tar"
    command = [str(ROOT / "script/train"), "-i", f"dataset=@{dataset_zip}", "-i", "max_steps=8", "-i",
               "learning_rate=0.01", "-i", "batch_size=2", "-i", "lora_rank=8", "-i", "validation_fraction=0.1",
               "-o", str(out)]
    with subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                          cwd=tmp_path) as process:
        lines = iter(process.stderr)
        url = next(re.search(r"training on (\S+)", line).group(1) for line in lines if "training on" in line)
        first = next(line for line in lines if line.startswith("dataset:"))
        try:
            status = requests.get(f"{url}/health-check", timeout=5).json()["status"]
        except requests.RequestException as exc:
            status = f"unreachable ({exc})"
        rest = "".join(lines)
    assert process.returncode == 0, rest
    assert status == "BUSY", f"the first log line came when the server was {status}"
    assert rest.index("step 1/8") < rest.index("training done")
    assert re.search(r"step 8/8 .*loss [\d.]+ +learning rate", rest)
    assert "validation loss" in rest
    # Never Cog's temporary file name (tmpb7b1i4aofile.zip) for the dataset.
    assert not re.search(r"tmp\w+file", first + rest), first + rest
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == sorted(ADAPTER_FILES)
        config = json.loads(tar.extractfile("adapter_config.json").read())
    assert config["r"] == 8 and config["peft_type"] == "LORA"


@pytest.mark.server
def test_script_train_fails_with_the_datasets_file_and_line(tmp_path, tiny_dir):
    lines, files = vqa_lines(3)
    raw = json.dumps(lines[0]) + "\n" + json.dumps({**lines[1], "images": ["img/nothere.png"]}) + "\n"
    dataset = make_zip(tmp_path / "bad.zip", lines, files, raw_jsonl=raw)
    result, out = script_train(tmp_path, tiny_dir, dataset)
    assert result.returncode == 1
    assert re.search(r"training failed: .*data\.jsonl line 2: image 'img/nothere.png' is not in the archive",
                     result.stderr), result.stderr
    assert not out.exists()


# --- (e) bad datasets --------------------------------------------------------------------------------------------


def _unsafe_tar(path):
    with tarfile.open(path, "w") as tar:
        for name, data in (("data.jsonl", b'{"question": "q", "answer": "a"}\n'), ("../escape.png", png_bytes(1))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _bad(kind: str, tmp_path):
    lines, files = vqa_lines(3)
    good = json.dumps(lines[0]) + "\n"
    if kind == "unsafe member":
        return _unsafe_tar(tmp_path / "bad.tar")
    raw = {
        "bad JSON line": good + "{not json\n",
        "missing image": good + json.dumps({**lines[1], "images": ["img/missing.png"]}) + "\n",
        "unreadable image": good + json.dumps({**lines[1], "images": ["img/broken.png"]}) + "\n",
        "unsafe image path": good + json.dumps({**lines[1], "images": ["../img/0.png"]}) + "\n",
        "empty data.jsonl": "\n",
        "no data.jsonl": None,
    }[kind]
    if kind == "unreadable image":
        files = {**files, "img/broken.png": png_bytes(5)[:60]}
    return make_zip(tmp_path / "bad.zip", lines, files, raw_jsonl=raw, data_name="data.jsonl" if raw else "")


BAD = {
    "bad JSON line": r"data\.jsonl line 2: not valid JSON",
    "missing image": r"data\.jsonl line 2: image 'img/missing.png' is not in the archive",
    "unreadable image": r"data\.jsonl line 2: broken\.png.* is not a readable image",
    "unsafe image path": r"data\.jsonl line 2: image path '\.\./img/0\.png' must stay inside the archive",
    "empty data.jsonl": r"data\.jsonl: no examples",
    "no data.jsonl": r"no data\.jsonl at the root of the archive",
    "unsafe member": r"\.\./escape\.png",
}


@pytest.mark.parametrize("kind", BAD)
def test_bad_datasets_fail_fast_with_the_file_and_line(kind, tmp_path, tiny_dir):
    with pytest.raises(InputError, match=BAD[kind]):
        train_adapter(_bad(kind, tmp_path), str(tiny_dir / "base"), ROOT / "weights",
                      TrainConfig(max_steps=1, device="cpu"), tmp_path / "run")
    assert not (tmp_path / "run" / "lora.tar").exists()


def test_unknown_target_modules_and_quantization_are_refused(dataset_zip, tiny_dir, tmp_path):
    with pytest.raises(InputError, match="target_modules"):
        train_adapter(dataset_zip, str(tiny_dir / "base"), ROOT / "weights",
                      TrainConfig(max_steps=1, device="cpu", target_modules=("no_such_layer",)), tmp_path)
    with pytest.raises(InputError, match="target_modules"):
        TrainConfig.parse_modules(" , ")
    assert TrainConfig.parse_modules("q_proj, v_proj") == ("q_proj", "v_proj")
    assert isinstance(DatasetError("x"), InputError)


@pytest.mark.server
def test_the_train_server_validates_inputs_against_the_schema(tiny_dir):
    """Out-of-range training inputs get Cog's 422 naming the input, before any training starts."""
    import requests

    from idefics_dev.cogrunner import CogServer

    with CogServer(env=tiny_env(tiny_dir), mode="train") as server:
        response = requests.post(f"{server.url}/trainings", json={"input": {"lora_rank": 0}}, timeout=30)
        assert response.status_code == 422
        assert {tuple(d["loc"][-1:]) for d in response.json()["detail"]} >= {("lora_rank",), ("dataset",)}
