"""Getting a media item's bytes from the URL a request names, and the item's identity.

`data:` URLs (and bare base64, as in OpenAI's `input_audio`) are decoded in place under the
size limit. http(s) URLs are fetched with an SSRF guard: the server must not become a proxy
into its own network, so a URL whose host resolves to a private, loopback, link-local,
multicast, reserved or unspecified address (IPv4 or IPv6, IPv4 embedded in IPv6 included) is
refused unless `allow_private_urls`. Every other scheme (file:, ftp:, ...) is refused.

DNS rebinding: the host is resolved once, here, and every address it resolves to must pass
the guard (one private address refuses the URL). The request is then sent to the checked
address itself: the URL's host is replaced by that IP, while the `Host` header and the TLS
server name (SNI and certificate check, via httpcore's `sni_hostname` extension) keep the
original name. A second, different DNS answer can therefore never be what we connect to.
Redirects are followed by hand, each hop resolved, checked and pinned the same way. Our own
client ignores proxy environment variables (a proxy would do its own resolution, past the
guard); a caller who passes a proxied `client` takes that on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import socket
from urllib.parse import unquote_to_bytes

import httpx

from mstar.media.limits import MediaError, MediaLimits, too_large

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_HEADERS = {
    "User-Agent": "mstar-media-fetch",
    # Media are already compressed; asking for identity keeps a gzip bomb out of the body.
    "Accept-Encoding": "identity",
}


def media_hash(data: bytes) -> str:
    """The identity of a media item by content (blake2b-128, hex): it keys the prefix and
    encoder-output caches, so one picture sent as a URL, a data URI or an upload is one
    entry."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _shown(url: str) -> str:
    """A URL as error messages show it (a data URL can be megabytes long)."""
    return url if len(url) <= 100 else url[:97] + "..."


# ------------------------------------------------------------------------------------------
# Inline data


def decode_base64(payload: str, limits: MediaLimits) -> bytes:
    """Base64 (standard or URL-safe alphabet, whitespace and missing padding tolerated) to
    bytes, refusing a payload over `max_bytes` before decoding it."""
    clean = "".join(payload.split())
    if (len(clean) * 3) // 4 - 2 > limits.max_bytes:
        raise too_large("inline media", limits.max_bytes, "bytes")
    clean += "=" * (-len(clean) % 4)
    try:
        if "-" in clean or "_" in clean:
            data = base64.b64decode(clean, altchars=b"-_", validate=True)
        else:
            data = base64.b64decode(clean, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("inline media is not valid base64") from None
    if len(data) > limits.max_bytes:
        raise too_large("inline media", limits.max_bytes, "bytes")
    return data


def decode_data_url(url: str, limits: MediaLimits) -> bytes:
    """RFC 2397: `data:[<mediatype>][;base64],<data>`; the data is base64 or percent-encoded."""
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise MediaError(f"malformed data URL {_shown(url)!r}: no ',' before the data")
    if header.split(";")[-1].strip().lower() == "base64":
        if "%" in payload:
            payload = unquote_to_bytes(payload).decode("ascii", errors="replace")
        return decode_base64(payload, limits)
    if len(payload) > 3 * limits.max_bytes:  # each byte is 1 to 3 characters
        raise too_large("inline media", limits.max_bytes, "bytes")
    data = unquote_to_bytes(payload)
    if len(data) > limits.max_bytes:
        raise too_large("inline media", limits.max_bytes, "bytes")
    return data


# ------------------------------------------------------------------------------------------
# The address guard


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is a public unicast address. IPv6 forms that carry an IPv4 address
    (mapped, 6to4, Teredo's client) are judged by that address too."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not _is_public(embedded):
            return False
    return ip.is_global and not (ip.is_private or ip.is_loopback or ip.is_link_local
                                 or ip.is_multicast or ip.is_reserved or ip.is_unspecified)


async def _checked_address(host: str, port: int, limits: MediaLimits) -> str:
    """The address to connect to for `host`: resolved once, every answer guarded."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise MediaError(f"cannot resolve the media URL's host {host!r}: {exc.strerror}") \
            from None
    addresses = [str(info[4][0]) for info in infos]
    if not addresses:
        raise MediaError(f"the media URL's host {host!r} resolves to no address")
    if not limits.allow_private_urls:
        for address in addresses:
            if not _is_public(ipaddress.ip_address(address)):
                raise MediaError(
                    f"refused to fetch media from {host!r}: it resolves to {address}, which "
                    "is not a public address (private, loopback, link-local, multicast or "
                    "reserved); the server fetches those only with --allow-private-media-urls")
    return addresses[0]


# ------------------------------------------------------------------------------------------
# http(s)


async def _pinned_request(client: httpx.AsyncClient, url: httpx.URL,
                          limits: MediaLimits) -> httpx.Request:
    """A GET of `url` sent to its host's checked address (see the module docstring)."""
    host = url.raw_host.decode("ascii")  # IDNA-encoded, as DNS and TLS see it
    if not host:
        raise MediaError(f"the media URL {_shown(str(url))!r} has no host")
    port = url.port or (443 if url.scheme == "https" else 80)
    address = await _checked_address(host, port, limits)
    extensions = {}
    if url.scheme == "https":
        extensions["sni_hostname"] = host
    return client.build_request(
        "GET", url.copy_with(host=address),
        headers={**_HEADERS, "Host": url.netloc.decode("ascii")},
        timeout=limits.fetch_timeout_s, extensions=extensions)


async def _read_body(response: httpx.Response, limits: MediaLimits, url: str) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise too_large(f"the media at {_shown(url)} ({declared} bytes)", limits.max_bytes,
                        "bytes")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limits.max_bytes:
            raise too_large(f"the media at {_shown(url)}", limits.max_bytes, "bytes")
    return bytes(body)


async def _fetch_http(url: str, limits: MediaLimits, client: httpx.AsyncClient) -> bytes:
    current = httpx.URL(url)
    for _ in range(limits.max_redirects + 1):
        request = await _pinned_request(client, current, limits)
        response = await client.send(request, stream=True, follow_redirects=False)
        try:
            location = response.headers.get("location")
            if response.status_code in _REDIRECT_STATUSES and location:
                current = current.join(location)
                if current.scheme not in ("http", "https"):
                    raise MediaError(f"fetching {_shown(url)}: refused a redirect to a "
                                     f"{current.scheme or 'relative'}: URL")
                continue
            if not response.is_success:
                raise MediaError(f"fetching {_shown(url)} failed: HTTP "
                                 f"{response.status_code} {response.reason_phrase}".rstrip())
            return await _read_body(response, limits, url)
        finally:
            await response.aclose()
    raise MediaError(f"fetching {_shown(url)}: more than {limits.max_redirects} redirects")


async def fetch_media(url: str, limits: MediaLimits, *,
                      client: httpx.AsyncClient | None = None) -> bytes:
    """The bytes of the media item at `url` (http, https or data), within `limits`:
    `max_bytes` (from Content-Length up front, then while streaming), `fetch_timeout_s` for
    the whole fetch (resolution, redirects and body included), `max_redirects`, and the
    address guard. A failure is a `MediaError` (400, or 413 over the size limit)."""
    scheme = url.partition(":")[0].strip().lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, limits)
    if scheme not in ("http", "https"):
        raise MediaError(f"unsupported media URL {_shown(url)!r}: only http, https and data "
                         "URLs are accepted")
    try:
        async with asyncio.timeout(limits.fetch_timeout_s):
            if client is not None:
                return await _fetch_http(url, limits, client)
            async with httpx.AsyncClient(trust_env=False) as own:
                return await _fetch_http(url, limits, own)
    except (TimeoutError, httpx.TimeoutException):
        raise MediaError(f"fetching {_shown(url)} timed out after "
                         f"{limits.fetch_timeout_s:g} s") from None
    except httpx.InvalidURL as exc:
        raise MediaError(f"invalid media URL {_shown(url)!r}: {exc}") from None
    except httpx.HTTPError as exc:
        raise MediaError(f"fetching {_shown(url)} failed: {exc}") from None
