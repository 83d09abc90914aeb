"""How our own clients (the runner, the tests' server helper, the benches) post a prediction: coglet's 409 retried."""

import time

import requests

RETRY_409_FOR = 30.0
RETRY_409_BACKOFF = (0.01, 0.5)  # first and longest pause, seconds: coglet frees a slot < 10 ms after a response


def post_prediction(url: str, body: dict, *, retry_for: float = RETRY_409_FOR, before_retry=None,
                    session: requests.Session | None = None, **kwargs) -> requests.Response:
    """POST `body`, sent again while coglet 0.23.1 answers 409, which it also does a moment after a response, before
    it takes the slot back. `before_retry(response)` runs before each retry; `kwargs` go to `requests.post`."""
    post = (session or requests).post
    deadline, pause = time.monotonic() + retry_for, RETRY_409_BACKOFF[0]
    while True:
        response = post(url, json=body, **kwargs)
        if response.status_code != 409 or time.monotonic() + pause > deadline:
            return response
        response.close()
        if before_retry is not None:
            before_retry(response)
        time.sleep(pause)
        pause = min(2 * pause, RETRY_409_BACKOFF[1])
