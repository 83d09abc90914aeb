"""The review sheet (`--html FILE`): one self-contained HTML file a physician opens in a browser, offline. On top
the before/after chart and the table; then each question with its image(s), the reference, each configuration's
answer, its most probable choice and probability, the automatic verdicts, and a right/wrong mark (and a note) per
configuration, which a button exports as CSV. Images are data: URIs, the script is inline: nothing is fetched."""

import base64
import hashlib
import io
import json
from html import escape

from PIL import Image

from idefics_cog.errors import InputError
from idefics_cog.evaluation import chart
from idefics_cog.evaluation.datasets import Item
from idefics_cog.evaluation.report import labels, table

THUMBNAIL = 640  # px, the longest side of an embedded image: enough to judge, and the file stays small
COLUMNS = ["number", "where", "configuration", "question", "reference", "answer", "choice", "choice_probability",
           "answer_verdict", "choice_verdict", "mark", "note"]

STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
.warning { background: #fff4e5; border-left: 4px solid #d9822b; padding: .5em .8em; max-width: 60em; }
.chart { display: block; max-width: 100%; margin: 1em 0; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: .35em .5em; vertical-align: top; text-align: left; }
table.metrics td:not(:first-child) { text-align: right; }
tbody.example { border-top: 3px solid #555; }
#review { width: 100%; } #review td { overflow-wrap: anywhere; }
#review td.number { min-width: 7em; overflow-wrap: normal; }
td.images img { display: block; max-width: 240px; max-height: 240px; margin-bottom: .3em; }
.right { color: #1b7f3b; font-weight: 600; } .wrong { color: #b3261e; font-weight: 600; } .none { color: #777; }
td.mark label { display: block; white-space: nowrap; } td.mark input[type=text] { width: 12em; }
tr.marked td.mark { background: #eef6ee; }
#bar { position: sticky; top: 0; background: white; padding: .5em 0; border-bottom: 1px solid #ccc; }
"""

# Marks are kept in the browser's storage for this sheet (closing the tab loses nothing) and exported as CSV.
SCRIPT = """
const COLUMNS = %(columns)s;
const STORE = "idefics-review-" + %(sheet_id)s;
const rows = () => Array.from(document.querySelectorAll("tr.answer"));
function state(row) {
  const mark = row.querySelector("input[type=radio]:checked");
  return {mark: mark ? mark.value : "", note: row.querySelector("input[type=text]").value};
}
// A cell a spreadsheet would run as a formula (=, +, -, @ first: a model's answer, a note) gets a leading '.
function quote(value) {
  const text = /^[=+\\-@\\t\\r]/.test(String(value)) ? "'" + value : String(value);
  return '"' + text.replace(/"/g, '""') + '"';
}
function marksCsv() {
  const lines = [COLUMNS.join(",")];
  for (const row of rows()) {
    const values = Object.assign({}, row.dataset, state(row));  // data-choice-probability: choiceProbability
    lines.push(COLUMNS.map(c => quote(values[c.replace(/_(.)/g, (m, ch) => ch.toUpperCase())] ?? "")).join(","));
  }
  return lines.join("\\r\\n") + "\\r\\n";
}
function exportCsv() {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([marksCsv()], {type: "text/csv;charset=utf-8"}));
  link.download = "review-marks.csv";
  document.body.appendChild(link);
  link.click();
  link.remove();
}
function refresh() {
  const all = rows(), saved = {};
  let marked = 0;
  for (const row of all) {
    const s = state(row);
    row.classList.toggle("marked", s.mark !== "");
    if (s.mark) marked++;
    if (s.mark || s.note) saved[row.id] = s;
  }
  document.getElementById("count").textContent = marked + " of " + all.length + " answers marked";
  try { localStorage.setItem(STORE, JSON.stringify(saved)); } catch (e) {}
}
function restore() {
  let saved = {};
  try { saved = JSON.parse(localStorage.getItem(STORE) || "{}"); } catch (e) {}
  for (const [id, s] of Object.entries(saved)) {
    const row = document.getElementById(id);
    if (!row) continue;
    const radio = row.querySelector("input[type=radio][value='" + s.mark + "']");
    if (radio) radio.checked = true;
    row.querySelector("input[type=text]").value = s.note || "";
  }
}
document.getElementById("export").addEventListener("click", exportCsv);
document.getElementById("review").addEventListener("input", refresh);
restore();
refresh();
"""


def image_uri(image: Image.Image) -> str:
    picture = image.convert("RGB")
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _verdict(value: bool | None) -> tuple[str, str]:
    return ("none", "") if value is None else (("right", "right") if value else ("wrong", "wrong"))


def _images(item: Item) -> str:
    try:
        pictures = item.example.load_images()
    except InputError as exc:
        return escape(str(exc))
    return "".join(f'<img alt="image {i + 1} of {escape(item.where)}" src="{image_uri(p)}">'
                   for i, p in enumerate(pictures)) or "(no image)"


def _answer_row(index: int, column: int, label: str, record: dict, first: str) -> str:
    answer_class, answer_verdict = _verdict(record.get("correct"))
    choice_class, choice_verdict = _verdict(record.get("choice_correct"))
    probability = record.get("choice_probability")
    data = {"number": index + 1, "where": record["where"], "configuration": label,
            "question": record["question"], "reference": record["reference"], "answer": record.get("prediction", ""),
            "choice": record.get("choice", ""),
            "choice_probability": "" if probability is None else f"{probability:.4f}",
            "answer_verdict": answer_verdict, "choice_verdict": choice_verdict}
    attributes = " ".join(f'data-{key.replace("_", "-")}="{escape(str(value))}"' for key, value in data.items())
    answer = escape(record.get("prediction", ""))
    if record.get("error"):
        answer += f'<br><span class="none">error: {escape(record["error"])}</span>'
    if record.get("correct") is None:  # an open question: no verdict, the token F1 as a hint
        automatic = f'<span class="none">open; token F1 {100 * record["f1"]:.0f}%</span>'
    else:
        automatic = f'answer: <span class="{answer_class}">{answer_verdict}</span>'
    if record.get("choice"):
        choice = f'{escape(record["choice"])} <span class="none">(p = {probability:.2f})</span>'
        automatic += f'<br>choice: <span class="{choice_class}">{choice_verdict}</span>'
    else:
        choice = f'<span class="none">{escape(record.get("choice_error", "none"))}</span>'
    name = f"mark-{index}-{column}"
    marks = "".join(f'<label><input type="radio" name="{name}" value="{value}"> {value}</label>'
                    for value in ("right", "wrong"))
    marks += '<input type="text" placeholder="note" aria-label="note">'
    return (f'<tr class="answer" id="q{index}-c{column}" {attributes}>{first}<td>{escape(label)}</td>'
            f'<td>{answer}</td><td>{choice}</td><td>{automatic}</td><td class="mark">{marks}</td></tr>')


def render(items: list[Item], results: list[dict], title: str, limit: int = 0) -> str:
    """The first `limit` questions (all when 0): a browser copes with a few hundred images, not a test set's
    thousands; the chart and the table always cover every question."""
    names = labels(results)
    shown = items[:limit] if limit else items
    header, *rows = table(results)
    metrics = ("<table class=\"metrics\"><thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in header)
               + "</tr></thead><tbody>" + "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>"
                                                   for cells in rows) + "</tbody></table>")
    chart_uri = "data:image/png;base64," + base64.b64encode(chart.png(results)).decode()
    body = []
    for index, item in enumerate(shown):
        span = len(results)
        first = (f'<td class="number" rowspan="{span}">{index + 1}<br><span class="none">{escape(item.where)}</span>'
                 f'</td><td class="images" rowspan="{span}">{_images(item)}</td>'
                 f'<td rowspan="{span}">{escape(item.question)}</td><td rowspan="{span}">{escape(item.reference)}</td>')
        answers = [_answer_row(index, column, names[column], result["predictions"][index],
                               first if column == 0 else "") for column, result in enumerate(results)]
        body.append('<tbody class="example">' + "".join(answers) + "</tbody>")
    sheet_id = hashlib.sha256(json.dumps([[r["label"], r["predictions"]] for r in results], sort_keys=True,
                                         default=str).encode()).hexdigest()[:16]
    script = SCRIPT % {"columns": json.dumps(COLUMNS), "sheet_id": json.dumps(sheet_id)}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="warning"><strong>Not a medical device.</strong> These answers come from a research model and can be wrong in
ways that look convincing. Mark each answer right or wrong; the automatic verdicts only compare words and
probabilities.</p>
<img class="chart" alt="metrics by configuration (%)" src="{chart_uri}">
{metrics}
<p>{len(shown)} of {len(items)} questions below{"" if len(shown) == len(items) else f" (the first {len(shown)})"}; the
chart and the table cover all of them.</p>
<div id="bar"><button type="button" id="export">Export marks as CSV</button> <span id="count"></span></div>
<table id="review"><thead><tr><th>#</th><th>image</th><th>question</th><th>reference</th><th>configuration</th>
<th>answer</th><th>most probable choice</th><th>automatic verdict</th><th>your mark</th></tr></thead>
{"".join(body)}
</table>
<script>{script}</script>
</body></html>
"""
