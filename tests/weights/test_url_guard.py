"""What a stranger may name (weights/url_guard.py): public https URLs, hub ids, never a local path.

Addresses other than loopback are only ever resolved here (socket.getaddrinfo patched), never connected to:
connections are recorded, and a test fails if one goes anywhere but 127.0.0.1."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from idefics_cog.weights import url_guard
from idefics_cog.weights.url_guard import (ALLOW_PRIVATE, SourceRefused, check_request_source, check_url, guarded_session,
                                 is_public)
from tests.support.fileserver import FileServer

FAKE_HOSTS = {"private.test": "10.0.0.5", "metadata.test": "169.254.169.254", "public.test": "8.8.8.8",
              "loopback.test": "127.0.0.1", "v6-loopback.test": "::1", "mixed.test": ("8.8.8.8", "192.168.1.7")}


@pytest.fixture
def fake_dns(monkeypatch):
    """Names in FAKE_HOSTS resolve to their addresses; every connection is recorded (and refused unless loopback)."""
    real = socket.getaddrinfo
    connections = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in FAKE_HOSTS:
            return real(host, port, *args, **kwargs)
        found = FAKE_HOSTS[host]
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                 (a, port or 443)) for a in ([found] if isinstance(found, str) else found)]

    def recording(real):
        def create_connection(address, *args, **kwargs):
            connections.append(address)
            if address[0] not in ("127.0.0.1", "localhost"):
                raise AssertionError(f"a test tried to connect to {address}")
            return real(address, *args, **kwargs)
        return create_connection

    import urllib3.util.connection

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "create_connection", recording(socket.create_connection))
    monkeypatch.setattr(urllib3.util.connection, "create_connection",
                        recording(urllib3.util.connection.create_connection))
    monkeypatch.delenv(ALLOW_PRIVATE, raising=False)
    return connections


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("10.0.0.5", False), ("172.16.3.4", False),
    ("192.168.1.7", False), ("127.0.0.1", False), ("::1", False), ("169.254.169.254", False),
    ("fe80::1%eth0", False), ("fc00::1", False), ("100.64.0.1", False), ("0.0.0.0", False),
    ("::ffff:127.0.0.1", False), ("224.0.0.1", False)])
def test_only_public_addresses_are_public(address, public):
    assert is_public(address) is public


@pytest.mark.parametrize("host", ["private.test", "metadata.test", "loopback.test", "v6-loopback.test",
                                  "mixed.test", "127.0.0.1", "[::1]", "169.254.169.254"])
def test_urls_resolving_to_a_non_public_address_are_refused_before_any_connection(fake_dns, host):
    with pytest.raises(SourceRefused, match=r"loopback, private or link-local address .*IDEFICS_ALLOW_PRIVATE_URLS"):
        guarded_session().get(f"https://{host}/adapter.tgz", timeout=1)
    assert fake_dns == []


def test_a_public_https_url_passes_the_check(fake_dns):
    check_url("https://public.test/adapter.tgz")  # resolving only: nothing is sent
    assert fake_dns == []


@pytest.mark.parametrize("url", ["http://public.test/adapter.tgz", "ftp://public.test/a.tgz", "file:///etc/passwd"])
def test_only_https_is_fetched(fake_dns, url):
    with pytest.raises(SourceRefused, match=r"only https URLs are fetched"):
        check_url(url)


def test_allow_private_urls_lifts_both_rules(fake_dns, monkeypatch):
    monkeypatch.setenv(ALLOW_PRIVATE, "1")
    check_url("http://private.test/adapter.tgz")
    check_url("https://metadata.test/adapter.tgz")
    with pytest.raises(SourceRefused, match="only http"):
        check_url("file:///etc/passwd")


class _Redirecting(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", self.server.location)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.mark.slow
def test_a_redirect_to_a_private_address_is_refused_before_it_is_followed(fake_dns):
    """A loopback server (allowed for this test only) redirects to a name that resolves to 10.0.0.5."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Redirecting)
    httpd.location = "http://private.test:8080/secret"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        session = guarded_session(allowed=lambda address: address == "127.0.0.1", schemes=("http", "https"))
        with pytest.raises(SourceRefused, match=r"private.test.*10\.0\.0\.5"):
            session.get(f"http://127.0.0.1:{httpd.server_address[1]}/adapter.tgz", timeout=5)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [host for host, _ in fake_dns] == ["127.0.0.1"]  # the redirect was never sent


@pytest.mark.parametrize("source", ["/etc", "./weights/tiny", "~/adapter", "weights", "file:///etc/passwd",
                                    "../x/y", "a/b/c", ""])
def test_a_request_never_names_a_local_path(source):
    with pytest.raises(SourceRefused, match=r"neither an https URL .*local paths are never read"):
        check_request_source(source)


def test_url_guard_reads_allow_private_at_call_time(monkeypatch):
    monkeypatch.setenv(ALLOW_PRIVATE, "1")
    assert url_guard.private_allowed()
    monkeypatch.setenv(ALLOW_PRIVATE, "0")
    assert not url_guard.private_allowed()


def test_a_name_that_resolves_elsewhere_by_the_time_of_connecting_is_refused(fake_dns, monkeypatch):
    """DNS rebinding: the name resolves to an allowed address when the URL is checked, then to a private one. The
    connection goes to an address checked as it connects, so nothing reaches the private address."""
    answers = iter(["127.0.0.1"] + ["10.0.0.5"] * 5)
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    session = guarded_session(allowed=lambda address: address == "127.0.0.1", schemes=("http", "https"))
    with pytest.raises(SourceRefused, match=r"rebind.test.*10\.0\.0\.5"):
        session.get("http://rebind.test:8080/adapter.tgz", timeout=5)
    assert all(address[0] != "10.0.0.5" for address in fake_dns)


def test_a_pinned_connection_reaches_the_checked_loopback_server(monkeypatch):
    """The pinned connection still talks HTTP to the name's (checked) address: a loopback file server answers."""
    with FileServer() as files:
        url = files.add("/x.bin", b"abc")
        session = guarded_session(allowed=lambda address: address == "127.0.0.1", schemes=("http", "https"))
        assert session.get(url, timeout=5).content == b"abc"
