"""client.post_prediction against a real HTTP server on 127.0.0.1 that answers 409 as coglet does when every
slot is busy (or for a moment after a response, before it has taken the finished prediction's slot back)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from idefics_dev.client import RETRY_409_BACKOFF, post_prediction

AT_CAPACITY = {"error": "At capacity - all prediction slots busy", "status": "failed"}


class Slots:
    """/predictions answering 409 to the first `refuse` requests, then `then` (200 with the prediction)."""

    def __init__(self, refuse: int, then: int = 200):
        self.refuse, self.then = refuse, then
        self.bodies: list[dict] = []
        self.times: list[float] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.bodies.append(body)
                owner.times.append(time.monotonic())
                status = 409 if len(owner.bodies) <= owner.refuse else owner.then
                answer = AT_CAPACITY if status == 409 else {"status": "succeeded", "output": body["input"]["x"]}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/predictions"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "Slots":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def test_a_409_is_sent_again_after_a_short_pause_and_the_answer_returned():
    refused = []
    with Slots(refuse=1) as server:
        response = post_prediction(server.url, {"input": {"x": "hello"}}, before_retry=refused.append, timeout=10)
    assert response.status_code == 200 and response.json() == {"status": "succeeded", "output": "hello"}
    assert server.bodies == [{"input": {"x": "hello"}}] * 2  # the same request, sent twice
    assert [r.status_code for r in refused] == [409]  # before_retry saw the refusal
    pause = server.times[1] - server.times[0]
    assert RETRY_409_BACKOFF[0] <= pause < 0.5  # short: coglet frees the slot within milliseconds


def test_the_pauses_grow_and_the_last_409_is_returned_when_the_time_is_up():
    with Slots(refuse=1000) as server:
        start = time.monotonic()
        response = post_prediction(server.url, {"input": {"x": "a"}}, retry_for=0.5, timeout=10)
        elapsed = time.monotonic() - start
    assert response.status_code == 409 and response.json() == AT_CAPACITY
    assert elapsed < 1.5
    # 10, 20, 40, 80, 160 ms pauses fit in 0.5 s (not a busy loop): about 6 requests in all.
    assert 3 <= len(server.bodies) <= 8, len(server.bodies)
    pauses = [b - a for a, b in zip(server.times, server.times[1:])]
    assert pauses[-1] > pauses[0]


@pytest.mark.parametrize("status", [422, 503, 500])
def test_other_refusals_are_not_retried(status):
    with Slots(refuse=0, then=status) as server:
        response = post_prediction(server.url, {"input": {"x": "a"}}, timeout=10)
    assert response.status_code == status and len(server.bodies) == 1
