"""What a request may name as `lora_weights`: an https URL of a public address, or a Hugging Face repo id.

The operator's settings (IDEFICS_BASE_WEIGHTS, IDEFICS_ADAPTER_WEIGHTS, COG_WEIGHTS) may name anything
(weights.resolve); a request comes from a stranger, so:
- it never names a local path, whatever it looks like (`weights/tiny` is a hub id here, never a directory);
- a URL is https, and every address its host resolves to is public (not loopback, private, link-local, ...),
  checked before each request is sent, redirects included (`guarded_session`);
- `IDEFICS_ALLOW_PRIVATE_URLS=1` lifts both URL rules (tests on loopback servers, private networks).
"""

import ipaddress
import socket
from typing import Callable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from idefics_cog.weights import HUB_ID, WeightsError, env_flag, is_url

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
    """Refuse `url` unless its scheme is in `schemes` and its host resolves only to addresses `allowed` says yes to
    (public ones by default). With IDEFICS_ALLOW_PRIVATE_URLS=1 (and no `allowed` given) any http(s) URL passes."""
    parts = urlsplit(url)
    if allowed is None and private_allowed():
        if parts.scheme not in ("http", "https"):
            raise SourceRefused(f"{url}: only http(s) URLs are fetched")
        return
    if parts.scheme not in schemes:
        raise SourceRefused(f"{url}: only https URLs are fetched (set {ALLOW_PRIVATE}=1 to allow http)")
    host = parts.hostname
    if not host:
        raise SourceRefused(f"{url}: the URL has no host")
    try:
        found = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise SourceRefused(f"{url}: the host {host!r} cannot be resolved ({exc})") from None
    addresses = sorted({info[4][0] for info in found})
    refused = [address for address in addresses if not (allowed or is_public)(address)]
    if refused or not addresses:
        raise SourceRefused(f"{url}: the host {host!r} resolves to a loopback, private or link-local address "
                            f"({', '.join(refused) or 'none'}); only public addresses are fetched "
                            f"(set {ALLOW_PRIVATE}=1 for private networks)")


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
    """A requests session that refuses URLs `check_url` refuses, redirects included. The address is checked just
    before urllib3 connects (which resolves the name again: a DNS answer that changes in between is not caught)."""
    session = requests.Session()
    session.trust_env = False  # no proxy from the environment: the check must see the real destination
    adapter = _CheckedAdapter(allowed, schemes)
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
    raise SourceRefused(f"{source!r} is neither an https URL of a .tar/.zip nor a Hugging Face repo id "
                        f"(owner/name[@revision]); local paths are never read for a request")
