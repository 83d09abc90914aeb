"""A real HTTP file server on 127.0.0.1 for the tests: in-memory files, byte ranges, request counts, faults.

    with FileServer() as server:
        url = server.add("/model.tgz", data)                         # http://127.0.0.1:<port>/model.tgz
        server.set_fault("/model.tgz", Fault(drop_after=1000, times=2))
        ...
        assert server.count("/model.tgz", "GET") == 1
        assert server.bytes_served("/model.tgz") == len(data)

Faults apply to one path, from the moment they are set. `skip` lets that many GET requests through untouched,
then the fault applies to the next `times` GETs (all of them when `times` is None). A HEAD request sees the
fault that the next GET will see (status, delay, range support) without using it up.
"""

import re
import socket
import threading
import zlib
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")
TRICKLE_PIECES = 100  # a trickled body arrives in this many pieces
FLIP = bytes(range(255, -1, -1))  # byte b -> 255 - b: corrupted, same length


@dataclass
class Fault:
    status: Optional[int] = None  # answer this status (e.g. 404) instead of the file
    delay: float = 0.0  # seconds to wait before answering (longer than the client's timeout: a timeout)
    drop_after: Optional[int] = None  # close the connection after this many bytes of the body
    corrupt: bool = False  # serve the body with every byte flipped (same length)
    ignore_range: bool = False  # a Range request gets 200 with the whole body
    accept_ranges: Optional[bool] = None  # send `Accept-Ranges: bytes` (None: when ranges are honoured)
    trickle: float = 0.0  # send the body in small pieces spread over this many seconds (a slow server)
    no_length: bool = False  # a GET announces no Content-Length (the body ends when the connection closes)
    location: Optional[str] = None  # with a 3xx `status`: where it redirects
    times: Optional[int] = None  # apply to this many GET requests only (None: every one)
    skip: int = 0  # let this many GET requests through untouched first


class FileServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, Fault] = {}
        self.requests: list[tuple[str, str, Optional[str]]] = []  # (method, path, Range header)
        self.served: Counter = Counter()  # body bytes written per path
        self.abandoned: Counter = Counter()  # bodies whose client went away before their end, per path
        self._seen: Counter = Counter()  # requests each path's fault has considered
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.handle_error = lambda request, address: None  # dropped connections are the point here
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> "FileServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()  # wakes handlers sleeping in a `delay` fault
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(self, path: str, data: bytes, fault: Optional[Fault] = None) -> str:
        """Serve `data` at `path` (replacing what was there); return its URL."""
        with self._lock:
            self.files[path] = data
            self._set_fault(path, fault)
        return self.url(path)

    def set_fault(self, path: str, fault: Optional[Fault]) -> None:
        with self._lock:
            self._set_fault(path, fault)

    def _set_fault(self, path: str, fault: Optional[Fault]) -> None:
        self._seen[path] = 0
        self.faults.pop(path, None)
        if fault is not None:
            self.faults[path] = fault

    def count(self, path: str, method: Optional[str] = None) -> int:
        """Requests received for `path` (of one method, or all)."""
        with self._lock:
            return sum(1 for m, p, _ in self.requests if p == path and method in (None, m))

    def ranges(self, path: str) -> list[Optional[str]]:
        """The Range header of each GET for `path`, in arrival order (None: the whole file)."""
        with self._lock:
            return [r for m, p, r in self.requests if p == path and m == "GET"]

    def bytes_served(self, path: str) -> int:
        with self._lock:
            return self.served[path]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.served.clear()

    def _record(self, method: str, path: str, range_header: Optional[str]) -> Optional[Fault]:
        """Log the request; return the fault that applies to it, if any."""
        with self._lock:
            self.requests.append((method, path, range_header))
            fault = self.faults.get(path)
            if fault is None:
                return None
            number = self._seen[path] + 1
            if method != "HEAD":  # a HEAD sees the fault that the next GET will see, without using it up
                self._seen[path] = number
            live = number > fault.skip and (fault.times is None or number <= fault.skip + fault.times)
            return fault if live else None


def _handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

        def log_message(self, *args) -> None:  # quiet test output
            pass

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            path = self.path.split("?", 1)[0]
            range_header = self.headers.get("Range")
            fault = server._record(self.command, path, range_header) or Fault()
            if fault.delay and server._closing.wait(fault.delay):
                return
            data = server.files.get(path)
            if fault.status is not None or data is None:
                return self._send_status(fault.status or 404, fault.location)
            start, end = 0, len(data)  # end exclusive
            match = RANGE.match(range_header or "")
            partial = match is not None and not fault.ignore_range
            if partial:
                start = int(match[1])
                end = min(int(match[2]) + 1, len(data)) if match[2] else len(data)
                if start >= len(data) or start >= end:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(206 if partial else 200)
            self.send_header("Content-Type", "application/octet-stream")
            if fault.no_length and send_body:
                self.send_header("Connection", "close")
                self.close_connection = True
            else:
                self.send_header("Content-Length", str(end - start))
            self.send_header("ETag", f'"{zlib.crc32(data):08x}"')
            advertise = not fault.ignore_range if fault.accept_ranges is None else fault.accept_ranges
            if advertise:
                self.send_header("Accept-Ranges", "bytes")
            if partial:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.end_headers()
            if send_body:
                self._send_body(path, data[start:end], fault)

        def _send_body(self, path: str, body: bytes, fault: Fault) -> None:
            if fault.corrupt:
                body = body.translate(FLIP)
            dropped = fault.drop_after is not None and fault.drop_after < len(body)
            if dropped:
                body = body[: fault.drop_after]
                self.close_connection = True
            try:
                self._write(body, fault.trickle)
            except OSError:  # the client went away
                with server._lock:
                    server.abandoned[path] += 1
                return
            with server._lock:
                server.served[path] += len(body)
            if dropped:
                # A dropped connection, not a polite close: the client sees fewer bytes than Content-Length.
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        def _write(self, body: bytes, trickle: float) -> None:
            pieces = TRICKLE_PIECES if trickle else 1
            size = -(-len(body) // pieces) or 1
            for number, start in enumerate(range(0, len(body), size)):
                if number and server._closing.wait(trickle / pieces):
                    raise OSError("the server is closing")
                self.wfile.write(body[start:start + size])
                self.wfile.flush()

        def _send_status(self, status: int, location: Optional[str] = None) -> None:
            body = f"{status}\n".encode()
            self.send_response(status)
            if location:
                self.send_header("Location", location)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

    return Handler
