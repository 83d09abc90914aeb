"""The review sheet (evaluation/sheet.py) and the results file a run resumes from (evaluation/journal.py), on
answers written here: the sheet's HTML parsed with the standard library's parser."""

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from PIL import Image

from idefics_cog.errors import InputError
from idefics_cog.evaluation import chart, datasets, sheet
from idefics_cog.evaluation.configuration import Configuration
from idefics_cog.evaluation.journal import Journal
from idefics_cog.evaluation.results import collect, question

CONFIGS = [Configuration("none"), Configuration("medical")]


def yes_no(best: str) -> list[dict]:
    """A choices table (as `choose` gives it) whose most probable candidate is `best`, at 0.75."""
    return [{"text": text, "probability": p, "logprob": -1.0, "mean_logprob": -1.0, "tokens": 1}
            for text, p in (("yes", 0.75 if best == "yes" else 0.25), ("no", 0.75 if best == "no" else 0.25))]


def answers(items, journal) -> list[dict]:
    """The base answers tersely and wrongly, the adapter verbosely; the adapter's choices are right."""
    for index, item in enumerate(items):
        for config, prediction in zip(CONFIGS, ["Yes.", "The bone looks <b>intact</b> to me."]):
            record = {**question(item, index), "prediction": prediction}
            if item.choices(("yes", "no")):
                right = item.reference
                record["choices"] = yes_no(right if config.adapter == "medical" else {"yes": "no"}.get(right, "yes"))
            journal.add(config, index, record)
    return collect(items, CONFIGS, journal)


class Sheet(HTMLParser):
    """Elements by tag with their attributes, the text of <script>, and every URL-carrying attribute."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, list[dict]] = {}
        self.script, self.in_script, self.text = "", False, []

    def handle_starttag(self, tag, attrs):
        self.tags.setdefault(tag, []).append(dict(attrs))
        self.in_script = tag == "script"

    def handle_endtag(self, tag):
        self.in_script = False

    def handle_data(self, data):
        if self.in_script:
            self.script += data
        else:
            self.text.append(data)


@pytest.fixture(scope="module")
def review(dataset, tmp_path_factory):
    items = datasets.load(dataset / "path-vqa", tmp_path_factory.mktemp("work"))
    results = answers(items, Journal())
    page = sheet.render(items, results, "Review sheet: path-vqa")
    parsed = Sheet()
    parsed.feed(page)
    return items, results, page, parsed


def test_each_answer_is_a_row_with_its_marks_and_the_data_the_csv_exports(review):
    items, _, _, parsed = review
    rows = [t for t in parsed.tags["tr"] if t.get("class") == "answer"]
    assert len(rows) == len(items) * len(CONFIGS) == 6
    assert [r["data-configuration"] for r in rows] == ["none", "medical"] * 3
    assert [r["data-reference"] for r in rows[::2]] == ["no", "yes", "the left lung"]
    assert rows[1]["data-answer"] == "The bone looks <b>intact</b> to me."  # the model's text stays text
    assert (rows[0]["data-choice"], rows[0]["data-choice-probability"]) == ("yes", "0.7500")
    assert (rows[0]["data-answer-verdict"], rows[0]["data-choice-verdict"]) == ("wrong", "wrong")  # "Yes." to "no"
    assert (rows[1]["data-answer-verdict"], rows[1]["data-choice-verdict"]) == ("wrong", "right")  # the gap
    assert (rows[4]["data-answer-verdict"], rows[4]["data-choice"]) == ("", "")  # the open question: no verdicts
    radios = [t for t in parsed.tags["input"] if t.get("type") == "radio"]
    assert len(radios) == 2 * len(rows)  # right and wrong, per configuration per question
    names = [r["name"] for r in radios]
    assert len(set(names)) == len(rows) and all(names.count(n) == 2 for n in names)
    assert {r["value"] for r in radios} == {"right", "wrong"}
    assert len([t for t in parsed.tags["input"] if t.get("type") == "text"]) == len(rows)  # a note each
    assert "looks <b>intact</b> to me" in "".join(parsed.text) and not parsed.tags.get("b")  # shown as text


def test_images_and_the_chart_are_embedded_and_nothing_is_fetched(review):
    items, _, page, parsed = review
    images = parsed.tags["img"]
    assert images[0]["class"] == "chart" and images[0]["src"].startswith("data:image/png;base64,")
    pictures = images[1:]
    assert len(pictures) == len(items)  # one image per question, once per question (not per configuration)
    for tag in pictures:
        assert tag["src"].startswith("data:image/jpeg;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(tag["src"].split(",", 1)[1])))
        assert decoded.size == (48, 40)  # small images are not enlarged
    urls = [value for tags in parsed.tags.values() for attrs in tags for key, value in attrs.items()
            if key in ("src", "href", "action", "srcset")]
    assert all(url.startswith("data:") for url in urls)
    assert not parsed.tags.get("link") and all("src" not in s for s in parsed.tags["script"])
    assert "http://" not in page and "https://" not in page


def test_the_csv_export_is_a_button_and_an_inline_script(review):
    _, _, _, parsed = review
    [button] = [t for t in parsed.tags["button"] if t.get("id") == "export"]
    assert button["type"] == "button"
    script = parsed.script
    assert 'getElementById("export").addEventListener("click", exportCsv)' in script
    assert "new Blob([marksCsv()]" in script and "text/csv" in script and 'link.download = "review-marks.csv"' in script
    assert f"const COLUMNS = {sheet.json.dumps(sheet.COLUMNS)};" in script  # the CSV's header row
    assert "localStorage" in script  # marks survive closing the tab


def test_the_chart_is_a_png_with_a_bar_group_per_metric(review):
    _, results, _, _ = review
    picture = Image.open(io.BytesIO(chart.png(results)))
    assert picture.format == "PNG" and picture.width == chart.WIDTH
    # grey (before) and blue (after) bars are drawn: the adapter's closed accuracy by choices is 100 %
    colors = {color for _, color in picture.convert("RGB").getcolors(1 << 20)}
    assert (0x8c, 0x8c, 0x8c) in colors and (0x1f, 0x6f, 0xb4) in colors
    assert results[1]["metrics"]["choice_accuracy"] == 1.0 and results[0]["metrics"]["choice_accuracy"] == 0.0


def test_a_results_file_resumes_and_refuses_another_dataset(dataset, tmp_path):
    items = datasets.load(dataset / "path-vqa", tmp_path / "work")
    path = tmp_path / "results.jsonl"
    with Journal(path) as journal:
        journal.add(CONFIGS[0], 0, {**question(items[0], 0), "prediction": "no"})
        journal.add(CONFIGS[0], 1, {**question(items[1], 1), "prediction": "yes"})
    path.write_text(path.read_text() + '{"key": "cut sho')  # killed in the middle of a line
    with Journal(path) as journal:
        assert journal.done(CONFIGS[0], 0, items[0].question)["prediction"] == "no"
        assert journal.done(CONFIGS[1], 0, items[0].question) is None  # another configuration
        assert journal.done(CONFIGS[0], 2, items[2].question) is None
        journal.add(CONFIGS[0], 2, {**question(items[2], 2), "prediction": "lung"})
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and lines[-1].startswith('{"key"')  # the cut line is gone, the new one whole
    with Journal(path, {"max_new_tokens": 64}) as journal:  # other settings: asked again
        assert journal.done(CONFIGS[0], 0, items[0].question) is None
    with Journal(path) as journal, pytest.raises(InputError, match="written for another dataset"):
        journal.done(CONFIGS[0], 1, "Another question?")
    path.write_text("not json\n")
    with pytest.raises(InputError, match="line 1 is not a record of `evaluate`"):
        Journal(path)


def test_csv_columns_are_a_csv_header():
    assert next(csv.reader([",".join(sheet.COLUMNS)])) == sheet.COLUMNS


def test_a_long_dataset_shows_its_first_questions_and_says_so(review):
    items, results, _, _ = review
    parsed = Sheet()
    parsed.feed(sheet.render(items, results, "Review", limit=2))
    assert len([t for t in parsed.tags["tr"] if t.get("class") == "answer"]) == 2 * len(CONFIGS)
    assert "2 of 3 questions below (the first 2)" in " ".join("".join(parsed.text).split())
    assert len(parsed.tags["img"]) == 1 + 2  # the chart (all questions) and two questions' images


@pytest.mark.skipif(shutil.which("node") is None, reason="node runs the sheet's script")
def test_the_script_parses_and_no_csv_cell_can_start_a_formula(review, tmp_path):
    """Run by a JavaScript engine: the script is valid (a Python escape turning into a raw tab once broke it), and
    a cell a spreadsheet would run as a formula gets a leading '."""
    _, _, _, parsed = review
    script = tmp_path / "sheet.js"
    script.write_text(parsed.script, encoding="utf-8")
    assert subprocess.run(["node", "--check", str(script)], capture_output=True, text=True).returncode == 0
    quote = re.search(r"function quote\(value\) \{.*?\n\}", parsed.script, re.S).group(0)
    values = ["=HYPERLINK(1)", "+1", "-2", "@x", "\tx", 'a "b"', 0.63, ""]
    check = tmp_path / "quote.js"
    check.write_text(f"{quote}\nfor (const v of {json.dumps(values)}) console.log(quote(v));\n", encoding="utf-8")
    out = subprocess.run(["node", str(check)], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ['"\'=HYPERLINK(1)"', '"\'+1"', '"\'-2"', '"\'@x"', '"\'\tx"', '"a ""b"""', '"0.63"', '""']


def test_a_failed_answer_is_asked_again_and_a_cut_line_dropped(tmp_path):
    path = tmp_path / "results.jsonl"
    with Journal(path) as journal:
        journal.add(CONFIGS[0], 0, {"question": "q0", "prediction": "", "error": "HTTP 422: ..."})
        journal.add(CONFIGS[0], 1, {"question": "q1", "prediction": "no"})
        journal.add(CONFIGS[0], 2, {"question": "q2", "prediction": "yes", "choice_error": "out of memory"})
    with open(path, "a", encoding="utf-8") as file:
        file.write('{"key": "cut short by a ki')  # the run was killed while writing
    with Journal(path) as journal:
        assert [journal.answered(CONFIGS[0], i, f"q{i}") for i in range(3)] == [False, True, False]
        journal.add(CONFIGS[0], 0, {"question": "q0", "prediction": "yes"})
    assert path.read_text(encoding="utf-8").endswith("\n")
    with Journal(path) as journal:
        assert journal.answered(CONFIGS[0], 0, "q0") and journal.done(CONFIGS[0], 0, "q0")["prediction"] == "yes"
