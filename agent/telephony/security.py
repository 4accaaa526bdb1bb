"""Twilio request signatures (`X-Twilio-Signature`), as Twilio documents them.

signature = base64(HMAC-SHA1(key = the account's auth token, message = the full URL Twilio requested, query string
included, followed by every POST parameter as name + value, sorted by name (then value), with no separators)).
A WebSocket upgrade (a `<Stream>` connection) is a GET: the message is the URL alone. Like Twilio's own helper
libraries we accept the URL with and without an explicit default port (:443 for https/wss, :80 for http/ws), as
proxies differ on which one reaches the application. Comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}


def twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]] = ()) -> str:
    message = url + "".join(name + value for name, value in sorted(params))
    digest = hmac.new(auth_token.encode("utf-8"), message.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def url_variants(url: str) -> list[str]:
    """The URL as given, plus the same with its default port added or removed."""
    parts = urlsplit(url)
    default = DEFAULT_PORTS.get(parts.scheme)
    if default is None or parts.hostname is None:
        return [url]
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    if parts.username or parts.password:
        return [url]
    if parts.port is None:
        other = urlunsplit(parts._replace(netloc=f"{host}:{default}"))
    elif parts.port == default:
        other = urlunsplit(parts._replace(netloc=host))
    else:
        return [url]
    return [url, other]


def valid_twilio_signature(auth_token: str, url: str, params: Iterable[tuple[str, str]], signature: str | None) -> bool:
    if not signature:
        return False
    params = list(params)
    return any(hmac.compare_digest(twilio_signature(auth_token, candidate, params).encode(), signature.encode())
               for candidate in url_variants(url))
