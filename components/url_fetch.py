"""Fetching image URLs for ingest without reaching internal addresses (SSRF).

:func:`fetch_url` GETs http(s) URLs only; without ``allow_private`` every address the host resolves to must be
public, every redirect is checked like the first URL, and the address actually connected to is checked again
(DNS rebinding). Responses are streamed and capped at ``max_bytes``. Refusals raise
:class:`~blip_core.data.checks.Rejected` (``blocked_url``, ``too_large``, ``missing_image``).
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from blip_core.data.checks import Rejected
from blip_core.redact import redact


class _BlockedAddress(OSError):
    """A connection reached an address that image URLs may not reach."""


def _private(ip: str) -> bool:
    """Whether ``ip`` is private, loopback, link-local, reserved, multicast or unspecified (v4 or v6)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved or addr.is_multicast
            or addr.is_unspecified)


def check_url(url: str, allow_private: bool = False) -> None:
    """Raise :class:`Rejected` unless ``url`` is http(s) and (without ``allow_private``) every address its
    host resolves to is public."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Rejected("blocked_url", f"{redact(url)}: only http(s) URLs with a host are fetched")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as e:
        raise Rejected("missing_image", f"{redact(url)}: cannot resolve the host ({e})") from None
    if any(_private(info[4][0]) for info in infos):
        raise Rejected("blocked_url", f"{redact(url)}: the host resolves to a private, loopback or link-local "
                       "address (ingest.allow_private_urls)")


class _PeerCheck:
    """Mixin for http.client connections: refuse a connected peer at a private address (DNS rebinding)."""

    check_peer = True

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        if self.check_peer and _private(self.sock.getpeername()[0]):  # type: ignore[attr-defined]
            self.sock.close()  # type: ignore[attr-defined]
            raise _BlockedAddress("connected to a private, loopback or link-local address")


class _CheckedHTTP(_PeerCheck, http.client.HTTPConnection):
    pass


class _CheckedHTTPS(_PeerCheck, http.client.HTTPSConnection):
    pass


def _via_proxy(req: urllib.request.Request) -> bool:
    return bool(getattr(req, "_tunnel_host", None)) or req.has_proxy()


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        cls = type("Conn", (_CheckedHTTP,), {"check_peer": not _via_proxy(req)})
        return self.do_open(cls, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        cls = type("Conn", (_CheckedHTTPS,), {"check_peer": not _via_proxy(req)})
        return self.do_open(cls, req, context=self._context)


class _RedirectHandler(urllib.request.HTTPRedirectHandler):
    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(newurl, self.allow_private)  # every hop is checked like the first URL
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, max_bytes: int, allow_private: bool = False, timeout: float = 20) -> bytes:
    """GET an image URL: http(s) only, public addresses only (unless ``allow_private``; redirects and the
    connected peer are checked too), at most ``max_bytes`` (streamed; more raises ``Rejected("too_large")``)."""
    check_url(url, allow_private)
    handlers: list = [_RedirectHandler(allow_private)]
    if not allow_private:
        handlers += [_HTTPHandler(), _HTTPSHandler()]
    opener = urllib.request.build_opener(*handlers)
    try:
        with opener.open(url, timeout=timeout) as r:
            length = r.headers.get("Content-Length")
            if max_bytes and length and length.isdigit() and int(length) > max_bytes:
                raise Rejected("too_large", f"{redact(url)}: {length} bytes > {max_bytes} (ingest.max_member_bytes)")
            chunks, size = [], 0
            while chunk := r.read(1 << 20):
                chunks.append(chunk)
                size += len(chunk)
                if max_bytes and size > max_bytes:
                    raise Rejected("too_large", f"{redact(url)}: more than {max_bytes} bytes (ingest.max_member_bytes)")
            return b"".join(chunks)
    except urllib.error.URLError as e:
        if isinstance(e.reason, _BlockedAddress):
            raise Rejected("blocked_url", f"{redact(url)}: {e.reason} (ingest.allow_private_urls)") from None
        raise
