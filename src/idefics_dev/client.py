"""How our own clients (the runner, the tests' server helper, the benches) post a prediction: coglet's 409 retried."""

import time

import requests

# How long a client keeps sending a prediction that coglet refuses with 409 (every slot busy), and its pauses:
# the first short, since coglet frees a finished prediction's slot a moment (< 10 ms here) after its response.
RETRY_409_FOR = 30.0
RETRY_409_BACKOFF = (0.01, 0.5)  # first pause and longest pause, seconds; each pause doubles the one before


def post_prediction(url: str, body: dict, *, retry_for: float = RETRY_409_FOR, before_retry=None,
                    session: requests.Session | None = None, **kwargs) -> requests.Response:
    """POST `body` to `url` (a /predictions or /trainings route), sending it again while the server answers 409.

    coglet 0.23.1 answers 409 "At capacity" while every slot (COG_MAX_CONCURRENCY) is busy, and also for a moment
    after a response: it sends a prediction's response as soon as the worker reports it done, but takes its slot
    back only when the worker's next message, on another channel, says the slot is idle (README, "Concurrency").
    A client that sends a request right after its previous one finished, or a burst that fills every slot, can
    meet that 409 though no prediction is running. Retries pause 10 ms, then twice as long each time, up to
    0.5 s, for up to `retry_for` seconds; `before_retry(response)` runs before each retry (the 409 in hand; e.g.
    to count them, or to check that the server is still up). Returns the first response that is not a 409, or
    the last 409 once the time is up. `kwargs` go to `requests.post` (headers, timeout, stream)."""
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
