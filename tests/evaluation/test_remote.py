"""`evaluate --endpoint` (evaluation/remote.py) through the real Cog server on the tiny model, on 127.0.0.1 only:
the same answers and choices as in this process, spread over two replicas, a busy replica's 409 asked again, and an
interrupted run resumed from its results file."""

import json
import threading
from html.parser import HTMLParser

import pytest

from idefics_cog.evaluation import datasets, remote
from idefics_cog.evaluation import run as ev
from idefics_cog.evaluation.configuration import Configuration
from idefics_dev.cogrunner import CogServer, free_port
from tests.conftest import tiny_env
from tests.evaluation.conftest import MAX_NEW_TOKENS
from tests.support.server import send

pytestmark = pytest.mark.slow

CONFIGS = [Configuration("none"), Configuration("medical")]
# A raw prompt on which the tiny model (greedy, no adapter) never says <end_of_utterance> within 480 tokens.
LONG = {"prompt": "chest normal", "template": "raw", "max_new_tokens": 480, "adapter": "none"}


@pytest.fixture(scope="module")
def one_slot(tiny_dir):
    """A second replica, with one prediction at a time: a second request at once gets 409."""
    with CogServer(env={**tiny_env(tiny_dir), "COG_MAX_CONCURRENCY": "1", "IDEFICS_MAX_BATCH": "1"}) as running:
        yield running


@pytest.fixture(scope="module")
def items(dataset, tmp_path_factory):
    return datasets.load(dataset / "data.zip", tmp_path_factory.mktemp("work"))


def test_a_fleet_gives_the_answers_and_choices_of_the_local_model(server, one_slot, items, expected):
    urls = [server.url, one_slot.url]
    results = remote.evaluate(urls, items, CONFIGS, MAX_NEW_TOKENS, concurrency=4)
    local = {r["label"]: r for r in expected[1]}
    for result in results:
        here = local[result["label"]]["predictions"]
        there = result["predictions"]
        # the chat (question 4) too: sent as `messages`, it renders the transcript evaluated here
        assert [r["prediction"] for r in there] == [r["prediction"] for r in here]
        assert "do not fit the model's context of 512 tokens" in there[4]["error"]
        for near, far in zip(here[:2], there[:2]):  # the closed questions: yes/no tables from `output_format` json
            assert [row["text"] for row in far["choices"]] == ["yes", "no"]
            assert [row["probability"] for row in far["choices"]] == pytest.approx(
                [row["probability"] for row in near["choices"]], abs=1e-4)
            assert far["choice"] == near["choice"]
        assert all("choices" not in r for r in there[2:])
        assert result["metrics"]["chosen"] == 2 and result["endpoints"] == urls
    served = {r["endpoint"] for result in results for r in result["predictions"]}
    assert served == set(urls)  # both replicas answered


def test_a_busy_replica_is_asked_again_until_it_answers(one_slot, items, expected):
    """The one slot is taken by a long answer: the evaluation's request gets 409 (coglet), waits, and goes through."""
    started, done = threading.Event(), {}

    def occupy():
        done["long"] = send(one_slot, LONG, True, lambda event, data, out: started.set() if event == "start" else None)

    one_slot.wait_ready(30)
    thread = threading.Thread(target=occupy)
    thread.start()
    assert started.wait(60)
    [result] = remote.evaluate([one_slot.url], items[:1], [Configuration("none")], MAX_NEW_TOKENS, concurrency=1)
    thread.join(120)
    [record] = result["predictions"]
    assert record["busy_retries"] >= 1, "the long answer held the slot: the first try got 409"
    assert record["prediction"] == expected[0]["none"][0]
    assert done["long"]["code"] == 200 and len("".join(done["long"]["chunks"])) > 0


class Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows = []

    def handle_starttag(self, tag, attrs):
        if tag == "tr" and dict(attrs).get("class") == "answer":
            self.rows.append(dict(attrs))


def test_an_interrupted_run_resumes_from_its_results_file(server, dataset, expected, tmp_path, capsys):
    results, report = tmp_path / "results.jsonl", tmp_path / "report.json"
    common = [str(dataset / "data.zip"), "--endpoint", server.url, "--adapter", "none", "--max-new-tokens",
              str(MAX_NEW_TOKENS), "--results", str(results), "--json", str(report)]
    assert ev.main([*common, "--limit", "2"]) == 0  # stopped after two questions
    first = sorted((json.loads(line) for line in results.read_text().splitlines()), key=lambda r: r["index"])
    assert [r["index"] for r in first] == [0, 1]  # (in the order they arrived: 4 at a time by default)
    first[0]["prediction"] = "kept from the first run"  # to see that it is not asked again
    results.write_text("".join(json.dumps(r) + "\n" for r in first))

    assert ev.main([*common, "--concurrency", "2", "--html", str(tmp_path / "review.html")]) == 0
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == [0, 1, 2, 3, 4]  # the three missing ones appended, once each
    predictions = [p["prediction"] for p in json.loads(report.read_text())["configurations"][0]["predictions"]]
    assert predictions == ["kept from the first run", *expected[0]["none"][1:]]
    assert json.loads(report.read_text())["endpoints"] == [server.url]
    table = capsys.readouterr().out
    assert "| questions | 5 (2 closed, 3 open) |" in table and "| scored by choices | 2 |" in table
    sheet = Rows()
    sheet.feed((tmp_path / "review.html").read_text())
    assert [row["data-answer"] for row in sheet.rows] == predictions


def test_an_endpoint_that_does_not_answer_stops_the_run_with_its_url(dataset, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code = ev.main([str(dataset / "data.zip"), "--endpoint", url, "--limit", "1", "--results",
                    str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert code == 1 and f"evaluate: {url}:" in err and "run the same command to go on" in err


def test_a_replica_that_cannot_be_reached_leaves_its_questions_to_the_others(server, items, expected, caplog):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    results = remote.evaluate([dead, server.url], items, CONFIGS[:1], MAX_NEW_TOKENS, concurrency=2)
    predictions = results[0]["predictions"]
    here = {r["label"]: r for r in expected[1]}[CONFIGS[0].label]["predictions"]
    assert [r["prediction"] for r in predictions] == [r["prediction"] for r in here]
    assert {r["endpoint"] for r in predictions} == {server.url}
    assert f"{dead}: " in caplog.text and "its questions go to the other endpoints (1 left)" in caplog.text
