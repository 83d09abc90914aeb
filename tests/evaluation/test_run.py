"""`idefics-cog evaluate` (evaluation/run.py, local.py): its table, its arguments, and whole runs on the tiny model
(the datasets are in conftest.py)."""

import json
import os
import subprocess
import sys

import pytest

from idefics_cog.config import ROOT
from idefics_cog.evaluation import datasets
from idefics_cog.evaluation import metrics as vqa
from idefics_cog.evaluation import run as ev
from idefics_cog.serving.jobs import Sampling
from tests.evaluation.conftest import MAX_NEW_TOKENS
from tests.support.fileserver import FileServer
from tests.support.helpers import tar_bytes

pytestmark = pytest.mark.slow  # make test-fast leaves it out


def test_markdown_table_has_a_column_per_configuration_and_the_difference():
    first = {"label": "none", "metrics": vqa.aggregate([vqa.score("no", "no"), vqa.score("x", "left lung")])}
    second = {"label": "trained.tar",
              "metrics": vqa.aggregate([vqa.score("yes", "no"), vqa.score("left", "left lung")])}
    table = ev.markdown_table([first, second]).splitlines()
    assert table[0] == "| metric (%) | none | trained.tar | difference |"
    assert "| closed accuracy (yes/no) | 100.0 | 0.0 | -100.0 |" in table
    assert "| closed accuracy (choices) | n/a | n/a | n/a |" in table  # none was scored by choices
    assert "| open recall | 0.0 | 50.0 | +50.0 |" in table
    assert "| questions | 2 (1 closed, 1 open) | 2 (1 closed, 1 open) |  |" in table
    alone = ev.markdown_table([{"label": "medical", "metrics": vqa.aggregate([vqa.score("x", "left lung")])}])
    assert alone.splitlines()[0] == "| metric (%) | medical |"
    assert "| closed accuracy (yes/no) | n/a |" in alone


def test_the_command_line_builds_one_or_two_configurations(tmp_path):
    data = tmp_path / "d.zip"
    data.write_bytes(b"")
    one = ev.parse_args([str(data)]).configurations
    assert one == [ev.Configuration("medical", "", 1.0)]
    url = "https://x/trained.tar#sha256=ab"
    two = ev.parse_args([str(data), "--adapter", "none", "--compare-lora-weights", url])
    assert two.configurations == [ev.Configuration("none"), ev.Configuration("medical", url)]
    assert [c.label for c in two.configurations] == ["none", "trained.tar"]
    scaled = ev.parse_args([str(data), "--compare-lora-scale", "0.5"]).configurations
    assert [c.label for c in scaled] == ["medical", "medical x0.5"]
    with pytest.raises(SystemExit):
        ev.parse_args([str(data), "--adapter", "none", "--compare-adapter", "none"])  # the same twice
    with pytest.raises(SystemExit):
        ev.parse_args([str(tmp_path / "missing.zip")])


# ----------------------------------------------------------------------------------------------------------------
# Whole runs on the tiny model

def test_an_adapter_gives_the_same_predictions_however_it_is_named(expected):
    predictions, results = expected
    assert [r["active"] for r in results][:2] == ["none", "medical"] and results[2]["active"].startswith("custom_")
    assert predictions["adapter"] == predictions["medical"] != predictions["none"]
    assert all(predictions["none"][:4]), "the tiny model answers something"
    assert [r["predictions"][4]["prediction"] for r in results] == ["", "", ""]
    assert all("do not fit the model's context of 512 tokens" in r["predictions"][4]["error"] for r in results)
    assert [r["metrics"]["errors"] for r in results] == [1, 1, 1]


def test_the_base_column_is_a_plain_greedy_prediction(expected, engine, dataset, tmp_path):
    """The same code path as a prediction: the transcript up to `Assistant:`, encode, greedy stream."""
    for item, prediction in zip(datasets.load(dataset / "data.zip", tmp_path)[:4], expected[0]["none"]):
        segments, _ = item.example.transcript(answer_last=False)
        answer = "".join(engine.stream(engine.encode(segments, item.example.load_images()), Sampling(MAX_NEW_TOKENS)))
        assert answer.strip() == prediction


def test_cli_compares_the_base_with_an_adapter_from_a_url(tiny_dir, dataset, expected, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.setenv("IDEFICS_CACHE_DIR", str(tmp_path / "cache"))
    with FileServer() as server:
        url = server.add("/trained.tgz", tar_bytes(tiny_dir / "adapter"))
        code = ev.main([str(dataset / "data.zip"), "--base", str(tiny_dir / "base"), "--adapter", "none",
                        "--compare-lora-weights", url, "--max-new-tokens", str(MAX_NEW_TOKENS),
                        "--json", str(tmp_path / "out.json"), "--markdown", str(tmp_path / "out.md")])
    assert code == 0
    table = (tmp_path / "out.md").read_text()
    assert capsys.readouterr().out == table  # stdout is the table alone
    lines = table.splitlines()
    assert lines[0] == "| metric (%) | none | trained.tgz | difference |"
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| closed accuracy (yes/no)", "| closed accuracy (choices)", "| open recall", "| token F1", "| exact match",
        "| BLEU-4", "| questions", "| scored by choices", "| errors (scored as empty)"]
    assert lines[-3:] == ["| questions | 5 (2 closed, 3 open) | 5 (2 closed, 3 open) |  |",
                          "| scored by choices | 2 | 2 |  |", "| errors (scored as empty) | 1 | 1 |  |"]

    report = json.loads((tmp_path / "out.json").read_text())
    assert report["max_new_tokens"] == MAX_NEW_TOKENS and report["base"] == str(tiny_dir / "base")
    assert report["medical"] is None  # neither configuration used the `medical` adapter, so none was loaded
    none, trained = report["configurations"]
    assert (none["label"], none["active"]) == ("none", "none")
    assert trained["lora_weights"] == url and trained["active"].startswith("custom_")
    # Each column has the predictions of that configuration (the URL's adapter is the tiny adapter).
    assert [p["prediction"] for p in none["predictions"]] == expected[0]["none"]
    assert [p["prediction"] for p in trained["predictions"]] == expected[0]["medical"]
    chat = none["predictions"][3]
    assert (chat["line"], chat["question"]) == (4, "Where is the lesion?")
    assert chat["reference"] == "In the right upper lobe."  # the last answer of the conversation
    assert [p["closed"] for p in none["predictions"]] == [True, True, False, False, False]

    for config in report["configurations"]:
        records = config["predictions"]
        for record in records:  # every record's scores are those of its prediction
            assert {k: record[k] for k in vqa.score("", "x")} == vqa.score(record["prediction"], record["reference"])
        assert vqa.aggregate(records) == config["metrics"]
        # closed accuracy again, from the raw texts: the first whole yes/no word against the reference
        verdicts = [vqa.verdict(r["prediction"]) == vqa.normalize(r["reference"]) for r in records[:2]]
        assert config["metrics"]["closed_accuracy"] == pytest.approx(sum(verdicts) / 2)
        row = next(line for line in lines if line.startswith("| token F1 |")).split(" | ")
        column = 1 if config is none else 2
        assert row[column] == f"{100 * config['metrics']['f1']:.1f}"


def test_python_m_idefics_cog_evaluate_runs_as_a_command(tiny_dir, dataset, expected, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "IDEFICS_CACHE_DIR": str(tmp_path / "cache"),
           "IDEFICS_BASE_WEIGHTS": str(tiny_dir / "base")}
    run = subprocess.run(
        [sys.executable, "-m", "idefics_cog.evaluation.run", str(dataset / "data.tar.gz"), "--adapter", "none",
         "--adapter-weights", str(tiny_dir / "adapter"), "--compare-adapter", "medical", "--limit", "2",
         "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", str(tmp_path / "out.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0] == "| metric (%) | none | medical | difference |"
    assert "| questions | 2 (2 closed, 0 open) | 2 (2 closed, 0 open) |  |" in run.stdout
    assert "| open recall | n/a | n/a | n/a |" in run.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["medical"] == str(tiny_dir / "adapter")
    for config, label in zip(report["configurations"], ["none", "medical"]):
        assert [p["prediction"] for p in config["predictions"]] == expected[0][label][:2]


def test_a_bad_adapter_source_fails_with_a_message(tiny_dir, dataset, capsys):
    code = ev.main([str(dataset / "data.zip"), "--base", str(tiny_dir / "base"), "--lora-weights", "/no/such/dir"])
    assert code == 1
    assert "evaluate: lora_weights: weight source '/no/such/dir' is not a directory" in capsys.readouterr().err


def test_a_closed_question_is_scored_by_its_answer_and_by_its_choices(expected, engine, dataset, tmp_path):
    """Each closed question's record has the yes/no table of `Engine.choose` (the base alone here, as the `none`
    column), its most probable candidate and both verdicts; open questions have none."""
    _, results = expected
    none = results[0]["predictions"]
    items = datasets.load(dataset / "data.zip", tmp_path)
    for item, record in zip(items[:2], none[:2]):
        segments, _ = item.example.transcript(answer_last=False)
        table = engine.choose(segments, item.example.load_images(), ["yes", "no"])
        assert [row["text"] for row in record["choices"]] == ["yes", "no"]
        assert [row["probability"] for row in record["choices"]] == pytest.approx([r["probability"] for r in table])
        assert sum(row["probability"] for row in record["choices"]) == pytest.approx(1)
        best = max(table, key=lambda row: row["probability"])
        assert (record["choice"], record["choice_probability"]) == (best["text"], pytest.approx(best["probability"]))
        assert record["choice_correct"] == (best["text"] == vqa.normalize(record["reference"]))
        assert record["correct"] == (vqa.verdict(record["prediction"]) == vqa.normalize(record["reference"]))
    assert all("choices" not in r and r.get("choice_correct") is None for r in none[2:])
    assert results[0]["metrics"]["chosen"] == 2
    assert results[0]["metrics"]["choice_accuracy"] == sum(r["choice_correct"] for r in none[:2]) / 2
    # the adapter changes the probabilities (the tiny model's are meaningless, but they are its own)
    assert none[0]["choices"] != results[1]["predictions"][0]["choices"]


def test_the_command_line_checks_endpoint_choices_and_concurrency(tmp_path):
    data = tmp_path / "d.zip"
    data.write_bytes(b"")
    args = ev.parse_args([str(data), "--endpoint", "http://127.0.0.1:5000/, http://127.0.0.1:5001"])
    assert args.endpoints == ["http://127.0.0.1:5000", "http://127.0.0.1:5001"] and args.concurrency == 8
    assert ev.parse_args([str(data)]).closed_choices == ("yes", "no")
    assert ev.parse_args([str(data), "--choices", "Yes, No"]).closed_choices == ("Yes", "No")
    assert ev.parse_args([str(data), "--choices", "none"]).closed_choices == ()
    assert ev.parse_args([str(tmp_path)]).dataset == tmp_path  # a folder of parquet files
    for wrong in (["--endpoint", "127.0.0.1:5000"], ["--endpoint", "http://a,http://a"],
                  ["--endpoint", "http://a", "--base", "weights/tiny/base"],
                  ["--endpoint", "http://a,http://b", "--concurrency", "1"], ["--concurrency", "4"],
                  ["--choices", "yes"], ["--choices", "yes,yes"], ["--endpoint", "http://a", "--lora-weights",
                                                                   str(tmp_path)]):
        with pytest.raises(SystemExit):
            ev.parse_args([str(data), *wrong])


def test_cli_evaluates_parquet_files_and_writes_the_review_sheet(tiny_dir, dataset, expected, tmp_path, capsys):
    """The hub layout (a folder of parquet files) gives the same answers as the archive's same questions."""
    code = ev.main([str(dataset / "path-vqa"), "--base", str(tiny_dir / "base"), "--adapter", "none",
                    "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", str(tmp_path / "out.json"),
                    "--html", str(tmp_path / "review.html")])
    assert code == 0
    assert "| scored by choices | 2 |" in capsys.readouterr().out
    [config] = json.loads((tmp_path / "out.json").read_text())["configurations"]
    records = config["predictions"]
    assert [r["where"] for r in records] == ["test-00000-of-00002.parquet row 1", "test-00000-of-00002.parquet row 2",
                                             "test-00001-of-00002.parquet row 1"]
    # the archive's first three questions, with the same images ("No." there is "no" here)
    assert [r["prediction"] for r in records] == expected[0]["none"][:3]
    assert [r["choice"] for r in records[:2]] == [r["choice"] for r in expected[1][0]["predictions"][:2]]
    page = (tmp_path / "review.html").read_text()
    assert page.count('<tr class="answer"') == 3 and page.count('src="data:image/jpeg;base64,') == 3
