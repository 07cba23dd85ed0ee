"""Outbound HTTP that cannot be pointed at internal services (SSRF).

The URL is checked when it is used, not when it is configured: its host is resolved once, every
address is checked, and the connection goes to an address that was checked. There is no second DNS
lookup, so a name that resolves to a public address for the check and to 127.0.0.1 for the connect
(DNS rebinding) gets nowhere. Redirects are not followed: they would be a way around the check.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flowdb.notifications.errors import NotificationError, OutboundURLRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_RESPONSE_BYTES = 64 * 1024
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _refusal(ip: IPAddress) -> str | None:
    """Why an address is not a public one, or None when it is."""
    for flag in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{flag}"):
            return flag.replace("_", "-")
    if not ip.is_global:  # e.g. 100.64.0.0/10, the carrier-grade NAT range cloud networks use internally
        return "non-global"
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # IPv6 forms that reach an IPv4 host (IPv4-mapped is judged on its own in check_address).
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def check_address(address: str | IPAddress, *, allow_private: bool = False) -> IPAddress:
    """The address, parsed; OutboundURLRefused when it is not public (unless allow_private)."""
    try:
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    except ValueError as exc:
        raise OutboundURLRefused(f"{address!r} is not an IP address") from exc
    if allow_private:
        return ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        # ::ffff:a.b.c.d reaches a.b.c.d: judge that (Python calls the whole ::ffff:0:0/96 range reserved).
        mapped_why = _refusal(ip.ipv4_mapped)
        why = f"{mapped_why} ({ip.ipv4_mapped} inside)" if mapped_why else None
    else:
        why = _refusal(ip)
    if why is None and isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None and (inner_why := _refusal(inner)) is not None:
            why = f"{inner_why} ({inner} inside)"
    if why is not None:
        raise OutboundURLRefused(
            f"address {ip} is {why}; outbound requests go to public addresses only"
            " (set FLOWDB_NOTIFY_ALLOW_PRIVATE=true to allow private networks)"
        )
    return ip


def redacted(url: str) -> str:
    """scheme://host[:port]/… : enough to recognise a URL in an error without its secret path."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if _safe_port(url) else ""
    return f"{parts.scheme}://{host}{port}/…"


def _safe_port(url: str) -> int | None:
    try:
        return urlsplit(url).port
    except ValueError:
        return None


@dataclass(frozen=True)
class Target:
    """A URL whose host was resolved and whose every address passed check_address."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    addresses: tuple[tuple[int, tuple[Any, ...]], ...]  # (family, sockaddr), all checked


def check_url(url: str, *, allow_private: bool = False) -> Target:
    """Parse, resolve and check a URL; OutboundURLRefused says why it may not be used."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise OutboundURLRefused(f"malformed URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise OutboundURLRefused(f"URL scheme {scheme or '(none)'!r} is not allowed; use https (or http)")
    if parts.username is not None or parts.password is not None:
        raise OutboundURLRefused("credentials in the URL are not supported")
    host = parts.hostname
    if not host:
        raise OutboundURLRefused(f"URL {redacted(url)} has no host")
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        # Resolution may fail for a while (DNS down): worth another attempt.
        raise OutboundURLRefused(f"host {host} does not resolve: {exc}", retryable=True) from exc
    addresses: list[tuple[int, tuple[Any, ...]]] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        try:
            check_address(str(sockaddr[0]), allow_private=allow_private)
        except OutboundURLRefused as exc:
            raise OutboundURLRefused(f"host {host} resolves to a refused address: {exc}") from exc
        addresses.append((family, tuple(sockaddr)))
    if not addresses:
        raise OutboundURLRefused(f"host {host} has no IPv4 or IPv6 address", retryable=True)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme=scheme, host=host, port=port, path=path, addresses=tuple(addresses))


def _connect_pinned(target: Target, timeout: float) -> socket.socket:
    """A TCP connection to one of the checked addresses, tried in resolver order."""
    last: OSError | None = None
    for family, sockaddr in target.addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    assert last is not None  # check_url never returns a target without addresses
    raise last


class PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to a checked address; the Host header still names the original host."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._target = target
        self._connect_timeout = timeout

    def connect(self) -> None:
        self.sock = _connect_pinned(self._target, self._connect_timeout)


class PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a checked address; the certificate is verified against the original host name."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._target = target
        self._connect_timeout = timeout

    def connect(self) -> None:
        sock = _connect_pinned(self._target, self._connect_timeout)
        try:
            self.sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._target.host)
        except BaseException:
            sock.close()
            raise


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    location: str | None
    body: bytes  # at most MAX_RESPONSE_BYTES


def post_json(url: str, payload: Any, *, timeout: float, allow_private: bool = False) -> Response:
    """POST payload as JSON to a checked URL. Any status comes back; network failures raise NotificationError."""
    target = check_url(url, allow_private=allow_private)
    conn: http.client.HTTPConnection = (
        PinnedHTTPSConnection(target, timeout) if target.scheme == "https" else PinnedHTTPConnection(target, timeout)
    )
    body = json.dumps(payload).encode()
    try:
        conn.request(
            "POST",
            target.path,
            body=body,
            headers={"Content-Type": "application/json; charset=utf-8", "User-Agent": "flowdb-notifier"},
        )
        resp = conn.getresponse()
        data = resp.read(MAX_RESPONSE_BYTES)  # bounded: a hostile endpoint cannot make us buffer gigabytes
        return Response(status=resp.status, reason=resp.reason, location=resp.getheader("Location"), body=data)
    except (OSError, http.client.HTTPException) as exc:
        raise NotificationError(f"POST to {redacted(url)} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        conn.close()
