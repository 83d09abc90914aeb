"""The local Cog runtime: what `cog predict` does, without Docker or the cog CLI: the real Cog server (coglet) run
from the repository root, and `-i name=value` / `-i name=@file` inputs as `cog predict` takes them."""

import argparse
import base64
import json
import mimetypes
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

from idefics_cog.config import DEFAULT_BASE_WEIGHTS, ROOT
from idefics_dev.client import post_prediction
from idefics_dev.schema import write_schema

STUBS = {"predict": ("COG_PREDICT_TYPE_STUB", "predict.py:Predictor"),
         "train": ("COG_TRAIN_TYPE_STUB", "train.py:train")}


TERMINAL = ("succeeded", "failed", "canceled")


class ServerError(RuntimeError):
    pass


class SetupFailed(ServerError):
    """setup() raised: the model could not be loaded (the message has setup's log)."""


def _raise_if_failed(status: str | None, detail: str) -> None:
    """SetupFailed for SETUP_FAILED, ServerError for UNHEALTHY (a crashed worker), with `detail` (logs)."""
    if status in ("SETUP_FAILED", "UNHEALTHY"):
        raise (SetupFailed if status == "SETUP_FAILED" else ServerError)(f"Cog server {status}:\n{detail}")


# After a failed start with no weights chosen: how to run here without the hub (script/predict's first use).
NO_WEIGHTS_HINT = (
    f"No IDEFICS_BASE_WEIGHTS is set, so the server loads {DEFAULT_BASE_WEIGHTS} (about 18 GB) from the Hugging "
    "Face hub. To try it without the hub: `make predict` (a tiny random model), or `make tiny` and then\n"
    "  IDEFICS_BASE_WEIGHTS=weights/tiny/base IDEFICS_ADAPTER_WEIGHTS=weights/tiny/adapter "
    "script/predict -i image=@my.png -i prompt=\"...\"\n"
    "Or set IDEFICS_BASE_WEIGHTS to a checkpoint directory, or HF_ENDPOINT to a reachable hub mirror "
    "(docs/deployment.md, \"Weight sources\")."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cog_yaml_concurrency(root: Path = ROOT) -> int | None:
    """`concurrency.max` of root/cog.yaml (None when it has none): `cog build` bakes it into the image as
    COG_MAX_CONCURRENCY, the number of predictions the server runs at once."""
    import yaml

    path = Path(root) / "cog.yaml"
    config = (yaml.safe_load(path.read_text()) if path.is_file() else None) or {}
    value = (config.get("concurrency") or {}).get("max")
    return int(value) if value is not None else None


def server_env(port: int, mode: str = "predict", extra: dict | None = None, root: Path = ROOT) -> dict:
    env = {**os.environ, **(extra or {}), "PORT": str(port)}
    stub_var, stub = STUBS[mode]
    env.setdefault(stub_var, stub)
    if "COG_MAX_CONCURRENCY" not in env:
        # As in the image `cog build` makes (for predictions and trainings alike); the caller's COG_MAX_CONCURRENCY
        # wins, as it does at `docker run`.
        concurrency = cog_yaml_concurrency(root)
        if concurrency is not None:
            env["COG_MAX_CONCURRENCY"] = str(concurrency)
    # The server starts its worker as plain `python` from PATH: it must be this environment's.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def server_command(host: str, mode: str = "predict") -> list[str]:
    return [sys.executable, "-m", "cog.server.http", "--host", host, "--x-mode", mode]


class CogServer:
    """The real Cog server on a free 127.0.0.1 port, started and always stopped (use it as a context manager)."""

    def __init__(self, env: dict | None = None, mode: str = "predict", root: Path = ROOT, log_path: Path | None = None):
        self.root, self.mode = Path(root), mode
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = server_env(self.port, mode, env, self.root)
        slots = self.env.get("COG_MAX_CONCURRENCY", "1")
        self.concurrency = int(slots) if slots.isdigit() else 1  # predictions at once (coglet: 1 if invalid)
        self.log_path = log_path or Path(tempfile.gettempdir()) / f"cog-server-{self.port}-{os.getpid()}.log"
        self.own_log = log_path is None  # a temporary file: removed once the server has stopped
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> "CogServer":
        write_schema(self.env.get("COG_PREDICT_TYPE_STUB", STUBS["predict"][1]),
                     self.env.get("COG_TRAIN_TYPE_STUB", STUBS["train"][1]), self.root)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(server_command("127.0.0.1", self.mode), cwd=self.root, env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def health(self) -> dict:
        return requests.get(f"{self.url}/health-check", timeout=5).json()

    def wait_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"Cog server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                health = self.health()
            except requests.RequestException:
                health = {}
            if health.get("status") == "READY":
                return health
            _raise_if_failed(health.get("status"), health.get("setup", {}).get("logs", ""))
            time.sleep(0.2)
        raise ServerError(f"Cog server not READY after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.own_log:
            self.log_path.unlink(missing_ok=True)

    def __enter__(self) -> "CogServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def predict(self, inputs: dict, timeout: float = 600) -> dict:
        """One prediction, waiting for the final JSON response."""
        return self._run("/predictions", inputs, timeout)

    def train(self, inputs: dict, timeout: float = 24 * 3600) -> dict:
        """One training (a server started with mode="train"), waiting for the final JSON response."""
        return self._run("/trainings", inputs, timeout)

    def follow_training(self, inputs: dict, timeout: float = 24 * 3600) -> Iterator[dict]:
        """Each state the server reports, by webhook: coglet 0.23.1 neither streams /trainings (406) nor answers
        GET /trainings/{id} (405)."""
        with WebhookReceiver() as hooks:
            response = self._post("/trainings", inputs, 60, body={"webhook": hooks.url},
                                  headers={"Prefer": "respond-async"})
            if response.status_code != 202:
                raise ServerError(f"HTTP {response.status_code}: {response.text}")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                try:
                    state = hooks.states.get(timeout=1)
                except queue.Empty:
                    self._check_alive()
                    continue
                yield state
                if state.get("status") in TERMINAL:
                    return
            raise ServerError(f"training not finished after {timeout:.0f} s")

    def _check_alive(self) -> None:
        """A crashed worker sends no final webhook: fail instead of waiting for one."""
        if self.process.poll() is not None:
            raise ServerError(f"Cog server exited with {self.process.returncode}:\n{self.log_tail()}")
        _raise_if_failed(self.health().get("status"), self.log_tail())

    def _post(self, route: str, inputs: dict, timeout: float, wait: float = 30, body: dict | None = None,
              **kwargs) -> requests.Response:
        """Waits up to `wait` seconds for a free slot (post_prediction)."""
        self.wait_ready(wait)  # READY: at least one slot is free (BUSY: all of them are taken)
        # An UNHEALTHY server (its worker crashed) answers 409 to everything: fail at once.
        return post_prediction(f"{self.url}{route}", {"input": inputs, **(body or {})}, retry_for=wait,
                               before_retry=lambda _: self._check_alive(), timeout=timeout, **kwargs)

    def _run(self, route: str, inputs: dict, timeout: float) -> dict:
        response = self._post(route, inputs, timeout)
        if response.status_code != 200:
            raise ServerError(f"HTTP {response.status_code}: {response.text}")
        return response.json()

    def stream(self, inputs: dict, timeout: float = 600) -> Iterator[tuple[str, dict]]:
        """One prediction over server-sent events: yields (event, data) pairs, ending with ("completed", response)."""
        with self._post("/predictions", inputs, timeout, stream=True,
                        headers={"Accept": "text/event-stream"}) as response:
            if response.status_code != 200:
                raise ServerError(f"HTTP {response.status_code}: {response.text}")
            yield from read_events(response)


class WebhookReceiver:
    """An HTTP endpoint on a free 127.0.0.1 port that queues the Cog server's webhooks (each one the whole state of a
    prediction or training so far; they may arrive out of order). Use it as a context manager."""

    def __init__(self):
        self.states: queue.Queue[dict] = queue.Queue()
        states = self.states

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                states.put(json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0)))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):  # no access log on the user's terminal
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_port}/"

    def __enter__(self) -> "WebhookReceiver":
        threading.Thread(target=self.http.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()


def read_events(response: requests.Response) -> Iterator[tuple[str, dict]]:
    """The server-sent events of a streamed response (`Accept: text/event-stream`), as (event, data) pairs."""
    event, data = "message", []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif not line and data:
            yield event, json.loads("\n".join(data))
            event, data = "message", []


def parse_inputs(pairs: list[str], schema: dict, component: str = "Input") -> dict:
    """`cog predict -i` syntax: name=value, name=@file (sent as a data URI); repeating a list input appends."""
    properties = schema["components"]["schemas"][component]["properties"]
    inputs: dict = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"-i {pair!r}: expected name=value")
        if name not in properties:
            raise SystemExit(f"-i {name}: unknown input; inputs are {', '.join(properties)}")
        prop = properties[name]
        if prop.get("type") == "array":
            inputs.setdefault(name, []).append(_convert(value, prop["items"]))
        else:
            inputs[name] = _convert(value, prop)
    return inputs


def _convert(value: str, prop: dict):
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise SystemExit(f"{path}: no such file")
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"
    kind = prop.get("type")
    if kind == "integer":
        return int(value)
    if kind == "number":
        return float(value)
    if kind == "boolean":
        return value.lower() in ("1", "true", "yes")
    return value


def run_prediction(pairs: list[str], env: dict | None = None) -> int:
    """Start the server, stream one prediction to stdout (logs to stderr), stop the server. Returns the exit code."""
    with CogServer(env=env) as server:
        schema = json.loads((server.root / ".cog/openapi_schema.json").read_text())
        inputs = parse_inputs(pairs, schema)
        mid_line = False  # keep the server's log lines off the line the answer is being written on
        for event, data in server.stream(inputs):
            if event == "output":
                print(data["chunk"], end="", flush=True)
                mid_line = True
            elif event == "log":
                print(("\n" if mid_line else "") + data["data"], end="", file=sys.stderr, flush=True)
                mid_line = False
            elif event == "completed":
                print()
                if data.get("status") != "succeeded":
                    print(f"prediction {data.get('status')}: {data.get('error')}", file=sys.stderr)
                    return 1
    return 0


def decode_data_uri(uri: str) -> bytes:
    header, sep, payload = uri.partition(",")
    if not (uri.startswith("data:") and sep and header.endswith(";base64")):
        raise ServerError(f"expected a base64 data URI, got {uri[:80]!r}")
    return base64.b64decode(payload)


def run_training(pairs: list[str], output: Path, env: dict | None = None) -> int:
    """Like `cog train`: start the server in train mode, run one training, print its logs to stderr as they come,
    write the weights (a data URI in `output.weights`) to `output`, stop the server. Returns the exit code."""
    with CogServer(env=env, mode="train") as server:
        schema = json.loads((server.root / ".cog/openapi_schema.json").read_text())
        inputs = parse_inputs(pairs, schema, "TrainingInput")
        print(f"training on {server.url} ...", file=sys.stderr, flush=True)
        shown = ""  # the logs printed so far: each webhook carries all of them
        for result in server.follow_training(inputs):
            logs = result.get("logs") or ""
            if logs.startswith(shown) and len(logs) > len(shown):  # a late, older webhook has fewer: skip it
                print(logs[len(shown):], end="", file=sys.stderr, flush=True)
                shown = logs
        if shown and not shown.endswith("\n"):
            print(file=sys.stderr)
        if result.get("status") != "succeeded":
            print(f"training {result.get('status')}: {result.get('error')}", file=sys.stderr)
            return 1
        weights = (result.get("output") or {}).get("weights")
        if not weights:
            print(f"training succeeded without weights in its output: {result.get('output')!r}", file=sys.stderr)
            return 1
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_bytes(decode_data_uri(weights))
        print(f"weights: {output} ({output.stat().st_size} bytes)", file=sys.stderr)
    return 0


def serve() -> None:
    """Regenerate the schema and run the server in the foreground (`PORT`, default 5000; `HOST`, default 0.0.0.0)."""
    port = int(os.environ.get("PORT", "5000"))
    env = server_env(port)
    write_schema(env["COG_PREDICT_TYPE_STUB"], env.get("COG_TRAIN_TYPE_STUB", STUBS["train"][1]))
    os.chdir(ROOT)
    os.execvpe(sys.executable, server_command(os.environ.get("HOST", "0.0.0.0")), env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cogrunner", description="Local Cog runtime (no Docker needed).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the Cog server in the foreground")
    predict = sub.add_parser("predict", help="like `cog predict`: one streamed prediction")
    predict.add_argument("-i", "--input", dest="inputs", action="append", default=[], metavar="NAME=VALUE")
    train = sub.add_parser("train", help="like `cog train`: one training, its weights written to -o")
    train.add_argument("-i", "--input", dest="inputs", action="append", default=[], metavar="NAME=VALUE")
    train.add_argument("-o", "--output", type=Path, default=Path("weights.tar"), help="where to write the weights "
                       "(default: weights.tar)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve()
    try:
        if args.command == "train":
            return run_training(args.inputs, args.output)
        return run_prediction(args.inputs)
    except ServerError as exc:
        print(exc, file=sys.stderr)
        if isinstance(exc, SetupFailed) and "IDEFICS_BASE_WEIGHTS" not in os.environ:
            print(NO_WEIGHTS_HINT, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
