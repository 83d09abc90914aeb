"""What a stranger may name (`lora_weights`, image URLs): an https URL whose host resolves only to public addresses,
checked before each request and redirect and again, to the very address, as each connection is made (DNS
rebinding); or a hub id, never a local path. IDEFICS_ALLOW_PRIVATE_URLS=1 lifts the URL rules."""

import ipaddress
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import connection as urllib3_connection

from idefics_cog.errors import WeightsError, shorten
from idefics_cog.weights.source import HUB_ID, env_flag, is_url

ALLOW_PRIVATE = "IDEFICS_ALLOW_PRIVATE_URLS"


class SourceRefused(WeightsError):
    """A request's source that the rules above forbid; refused before anything is sent."""


def private_allowed() -> bool:
    return env_flag(ALLOW_PRIVATE)


def is_public(address: str) -> bool:
    """A globally routable unicast address (8.8.8.8 yes; 127.0.0.1, 10.0.0.5, 169.254.169.254, ::1 no)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id is no part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def check_url(url: str, allowed: Callable[[str], bool] | None = None, schemes: tuple[str, ...] = ("https",)) -> None:
    """Refuse `url` unless its scheme is in `schemes` and its host resolves only to addresses `allowed` (public ones by
    default). With IDEFICS_ALLOW_PRIVATE_URLS=1 (and no `allowed` given) any http(s) URL passes."""
    parts = urlsplit(url)
    if allowed is None and private_allowed():
        if parts.scheme not in ("http", "https"):
            raise SourceRefused(f"{shorten(url)}: only http(s) URLs are fetched")
        return
    if parts.scheme not in schemes:
        raise SourceRefused(f"{shorten(url)}: only https URLs are fetched (set {ALLOW_PRIVATE}=1 to allow http)")
    if not parts.hostname:
        raise SourceRefused(f"{shorten(url)}: the URL has no host")
    checked_addresses(url, parts.hostname, parts.port or 443, allowed)


def checked_addresses(what: str, host: str, port: int, allowed: Callable[[str], bool] | None) -> list[str]:
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise SourceRefused(f"{shorten(what)}: the host {shorten(repr(host))} cannot be resolved "
                            f"({shorten(exc)})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in found))
    refused = [address for address in addresses if not (allowed or is_public)(address)]
    if refused or not addresses:
        raise SourceRefused(f"{shorten(what)}: the host {shorten(repr(host))} resolves to a loopback, private or "
                            f"link-local address "
                            f"({', '.join(sorted(refused)) or 'none'}); only public addresses are fetched "
                            f"(set {ALLOW_PRIVATE}=1 for private networks)")
    return addresses


class _PinnedConnection:
    """Connects to an address checked at that moment, not to the name, which urllib3 would resolve again (DNS
    rebinding). TLS still checks the certificate against the name."""

    allowed: Callable[[str], bool] | None = None

    def _new_conn(self) -> socket.socket:
        if self.allowed is None and private_allowed():
            return super()._new_conn()
        address = checked_addresses(f"{self.host}:{self.port}", self.host, self.port, self.allowed)[0]
        try:
            return urllib3_connection.create_connection((address, self.port), self.timeout,
                                                        source_address=self.source_address,
                                                        socket_options=self.socket_options)
        except TimeoutError as exc:
            raise ConnectTimeoutError(self, f"Connection to {self.host} timed out") from exc
        except OSError as exc:
            raise NewConnectionError(self, f"Failed to establish a new connection: {exc}") from exc


def _pinned_pools(allowed: Callable[[str], bool] | None) -> dict:
    check = staticmethod(allowed) if allowed is not None else None
    pools = {}
    for scheme, pool, connection in (("http", HTTPConnectionPool, HTTPConnection),
                                     ("https", HTTPSConnectionPool, HTTPSConnection)):
        pinned = type(f"Pinned{connection.__name__}", (_PinnedConnection, connection), {"allowed": check})
        pools[scheme] = type(f"Pinned{pool.__name__}", (pool,), {"ConnectionCls": pinned})
    return pools


class _CheckedAdapter(HTTPAdapter):
    """Checks every request's URL, the first and each redirect, before any connection is made."""

    def __init__(self, allowed: Callable[[str], bool] | None, schemes: tuple[str, ...]):
        super().__init__()
        self.allowed, self.schemes = allowed, schemes

    def send(self, request, *args, **kwargs):
        check_url(request.url, self.allowed, self.schemes)
        return super().send(request, *args, **kwargs)


def guarded_session(allowed: Callable[[str], bool] | None = None,
                    schemes: tuple[str, ...] = ("https",)) -> requests.Session:
    """A session that refuses what `check_url` refuses, redirects included, and connects only to addresses checked as
    it connects."""
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: the check must see the real destination
    adapter = _CheckedAdapter(allowed, schemes)
    adapter.poolmanager.pool_classes_by_scheme = _pinned_pools(allowed)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def check_request_source(source: str) -> str:
    """Return "url" or "hub" for a request's `lora_weights`, or refuse it (never a local path)."""
    if is_url(source):
        check_url(source)
        return "url"
    if HUB_ID.match(source) and ".." not in source.split("/"):
        return "hub"
    raise SourceRefused(f"{shorten(repr(source))} is neither an https URL of a .tar/.zip nor a Hugging Face repo id "
                        f"(owner/name[@revision]); local paths are never read for a request")
