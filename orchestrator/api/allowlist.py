"""Allow-lists of URL origins: where run webhooks may be sent (``MGMFLOW_WEBHOOK_HOSTS``) and where chat images may
be fetched from (``MGMFLOW_IMAGE_URL_HOSTS``).

An entry is an origin, ``scheme://host[:port]`` (``http://10.0.0.5:8080``); a bare host (``hooks.example.com``)
means ``https://hooks.example.com:443``. A URL is allowed when its scheme, host and port (the scheme's default when
it names none) are those of an entry: allowing a host's web server does not allow its other ports, nor plain http.
"""

from __future__ import annotations

from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


def url_origin(url: str) -> Origin:
    """``(scheme, host, port)`` of an http(s) URL without credentials; ``ValueError`` naming what is wrong."""
    parts = urlsplit(url)  # ValueError for a malformed IPv6 host
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError("it must be an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("it must not carry credentials")
    port = parts.port  # ValueError when out of range or not a number
    return parts.scheme, parts.hostname.lower(), port or DEFAULT_PORTS[parts.scheme]


def entry_origin(entry: str) -> Origin:
    """The origin an allow-list entry stands for."""
    return url_origin(entry if "://" in entry else f"https://{entry}")


def allowed(url: str, entries: list[str]) -> bool:
    """Whether ``url`` is on one of the origins of ``entries`` (``ValueError`` for a malformed URL)."""
    return url_origin(url) in {entry_origin(entry) for entry in entries}
