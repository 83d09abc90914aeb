"""Evaluation through deployed containers (`--endpoint URL[,URL...]`): each question is a prediction through the Cog
HTTP API (POST URL/predictions, images inline as data: URIs), N at a time spread over the URLs (a fleet of replicas
serves one large evaluation), each answer appended to the results file as it arrives."""

import base64
import itertools
import json
import logging
import mimetypes
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import requests
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from idefics_cog.evaluation.configuration import Configuration
from idefics_cog.evaluation.datasets import Item
from idefics_cog.evaluation.journal import Journal
from idefics_cog.evaluation.results import collect, progress, question
from idefics_cog.inputs.prompt import IMAGE_TOKEN

log = logging.getLogger(__name__)

# 409: every slot busy (coglet also answers it a moment after a response, before it frees the slot); 503: still in
# setup. Both are asked again, up to about 10 minutes (600 tries, at most 1 s apart, whatever a Retry-After says);
# urllib3 retries a connection refused too (a replica restarting), never a request that may have run.
BUSY = (409, 503)
RETRY = Retry(total=None, connect=10, read=0, redirect=0, status=600, other=0, status_forcelist=BUSY,
              allowed_methods=None, backoff_factor=0.02, backoff_max=1.0, raise_on_status=False,
              respect_retry_after_header=False)
TIMEOUT = (10, 1800)  # connect, and read: a long answer on a loaded replica
MAX_RESPONSE_BYTES = 16 << 20  # an answer of 2048 tokens as JSON with its logs is well under 1 MB
REFUSED = 422  # an input the server refused: recorded as that question's error, as a failed prediction is


class RemoteError(Exception):
    """An endpoint that does not answer as a Cog container does; the message names it."""


class Unreachable(RemoteError):
    """No connection to the endpoint (after urllib3's retries): a replica gone; the others take its questions."""


def data_uri(path: Path) -> str:
    try:
        with Image.open(path) as image:
            mime = Image.MIME.get(image.format or "")
    except (OSError, ValueError):  # not for PIL (e.g. DICOM): the server reads it by its content
        mime = None
    mime = mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(Path(path).read_bytes()).decode()}"


def messages(item: Item) -> list[dict]:
    """The example as chat messages, rendering the same transcript as in-process evaluation: the images with the
    first question, where its `<image>` placeholders put them, else after its text."""
    turns, count = item.example.turns, len(item.example.images)
    parts = turns[0].user.split(IMAGE_TOKEN)
    if len(parts) > 1:
        content = [p for i, text in enumerate(parts)
                   for p in ([{"type": "image"}] if i else []) + ([{"type": "text", "text": text}] if text else [])]
    else:
        content = ([{"type": "text", "text": turns[0].user}] if turns[0].user else []) + [{"type": "image"}] * count
    out = [{"role": "user", "content": content}]
    for previous, turn in itertools.pairwise(turns):
        out += [{"role": "assistant", "content": previous.assistant}, {"role": "user", "content": turn.user}]
    return out


def inputs(item: Item, config: Configuration, max_new_tokens: int) -> dict:
    body = {"messages": json.dumps(messages(item)), "max_new_tokens": max_new_tokens, "temperature": 0,
            "adapter": config.adapter, "lora_scale": config.lora_scale}
    if item.example.images:
        body["images"] = [data_uri(path) for path in item.example.images]
    if config.lora_weights:
        body["lora_weights"] = config.lora_weights
    return body


def session() -> requests.Session:
    http = requests.Session()
    http.mount("http://", HTTPAdapter(max_retries=RETRY))
    http.mount("https://", HTTPAdapter(max_retries=RETRY))
    return http


def predict(http: requests.Session, url: str, body: dict) -> tuple[str | None, str | None, int]:
    """(output joined, None, times told busy) or (None, the server's error, times told busy)."""
    try:
        with http.post(f"{url}/predictions", json={"input": body}, timeout=TIMEOUT, stream=True) as response:
            text = _read(response, url)
    except requests.ConnectionError as exc:  # refused or reset before an answer: nothing ran there to keep
        raise Unreachable(f"{url}: {exc}") from None
    except requests.RequestException as exc:
        raise RemoteError(f"{url}: {exc}") from None
    history = response.raw.retries.history if response.raw.retries else ()
    busy = sum(1 for event in history if event.status in BUSY)
    if response.status_code in BUSY:
        raise RemoteError(f"{url}: still HTTP {response.status_code} (busy or starting) after {busy} tries")
    if response.status_code == REFUSED:
        return None, f"HTTP 422: {text[:1000]}", busy
    if response.status_code != 200:
        raise RemoteError(f"{url}/predictions: HTTP {response.status_code}: {text[:300]}")
    try:
        result = json.loads(text)
    except ValueError:
        raise RemoteError(f"{url}/predictions: the answer is not JSON: {text[:300]!r}") from None
    output = result.get("output") if isinstance(result, dict) else None
    if not isinstance(result, dict) or not (output is None or isinstance(output, str) or (
            isinstance(output, list) and all(isinstance(piece, str) for piece in output))):
        raise RemoteError(f"{url}/predictions: not a Cog prediction's response: {text[:300]!r}")
    if result.get("status") != "succeeded":
        return None, str(result.get("error") or f"status {result.get('status')}"), busy
    return "".join(output or []), None, busy


def _read(response: requests.Response, url: str) -> str:
    """The body, at most MAX_RESPONSE_BYTES: an endpoint cannot fill this process's memory."""
    body = b""
    for chunk in response.iter_content(1 << 16):
        body += chunk
        if len(body) > MAX_RESPONSE_BYTES:
            raise RemoteError(f"{url}/predictions: the answer is over {MAX_RESPONSE_BYTES >> 20} MB")
    return body.decode("utf-8", errors="replace")


def ask(http, url: str, item: Item, config: Configuration, max_new_tokens: int, choices: tuple[str, ...]) -> dict:
    """As local.answer, through one endpoint: the greedy answer, then (if any) the candidates' table, with
    `output_format` json."""
    body = inputs(item, config, max_new_tokens)
    output, error, busy = predict(http, url, body)
    record = {"prediction": (output or "").strip(), "endpoint": url, "busy_retries": busy}
    if error is not None:
        record["error"] = error
        return record
    if choices:
        scoring = {**body, "choices": json.dumps(list(choices)), "output_format": "json"}
        output, error, busy = predict(http, url, scoring)
        record["busy_retries"] += busy
        if error is not None:
            record["choice_error"] = error
        else:
            try:
                record["choices"] = json.loads(output)["choices"]
                check_table(record["choices"], choices)
            except (ValueError, KeyError, TypeError):
                raise RemoteError(f"{url}: a `choices` prediction's output is not the JSON document with "
                                  f"\"choices\" (is the container older than `choices`? --choices none skips "
                                  f"them): {output[:200]!r}") from None
    return record


def check_table(table, texts: tuple[str, ...]) -> None:
    """A choices table as documented (docs/result.schema.json), for these candidates; else ValueError."""
    if not isinstance(table, list) or [row.get("text") if isinstance(row, dict) else None for row in table] != [
            text.strip() for text in texts]:
        raise ValueError("not the table of these candidates")
    for row in table:
        if not all(isinstance(row.get(key), (int, float)) for key in ("probability", "logprob", "mean_logprob")):
            raise ValueError("a row without its numbers")


def evaluate(urls: list[str], items: list[Item], configurations: list[Configuration], max_new_tokens: int,
             closed_choices: tuple[str, ...] = ("yes", "no"), journal: Journal | None = None,
             concurrency: int = 1) -> list[dict]:
    """Every (configuration, question) not in the journal yet, `concurrency` at a time; each worker thread keeps one
    endpoint (round robin) and its connection. An endpoint that cannot be reached is left, its question asked of
    the next one; the run stops when none is left."""
    journal = journal or Journal()
    todo = [(config, index, item) for config in configurations for index, item in enumerate(items)
            if not journal.answered(config, index, item.question)]
    total = len(configurations) * len(items)
    log.info("%d of %d answers to ask, %d at a time over %d endpoint(s)", len(todo), total, concurrency, len(urls))
    local, turn, live, lock = threading.local(), itertools.count(), list(urls), threading.Lock()

    def work(config: Configuration, index: int, item: Item) -> None:
        while True:
            with lock:
                if getattr(local, "url", None) not in live:
                    if not live:
                        raise RemoteError("no endpoint can be reached any more: " + ", ".join(urls))
                    local.url, local.http = live[next(turn) % len(live)], session()
            try:
                record = ask(local.http, local.url, item, config, max_new_tokens, item.choices(closed_choices))
                break
            except Unreachable as exc:
                with lock:
                    if local.url in live:
                        live.remove(local.url)
                        log.warning("%s; its questions go to the other endpoints (%d left)", exc, len(live))
                    if not live:
                        raise
        for problem in ("error", "choice_error"):
            if record.get(problem):
                log.warning("%s: %s: %s", config.label, item.where, record[problem])
        journal.add(config, index, {**question(item, index), **record})

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="evaluate") as pool, \
            progress(total, total - len(todo), "answers") as bar:
        futures = [pool.submit(work, *task) for task in todo]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update()
        except BaseException:  # the answers already in are kept (journal); the run resumes from there
            for future in futures:
                future.cancel()
            raise
    return collect(items, configurations, journal, {c: {"endpoints": urls} for c in configurations})
