"""The checks every agent backend with an endpoint makes of its agents-file entry."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from flowdb.errors import AgentConfigError


def endpoint_spec(name: str, kind: str, spec: Any, keys: frozenset[str], example: str, url_form: str) -> str:
    """Check that `spec` is a mapping of known keys with an http(s) `url`; return the url."""
    if not isinstance(spec, dict):
        raise AgentConfigError(f"agent {name!r}: {kind} takes a mapping: {example}")
    unknown = sorted(set(spec) - keys)
    if unknown:
        raise AgentConfigError(f"agent {name!r}: {kind} does not take {', '.join(map(str, unknown))} "
                               f"(it takes {', '.join(sorted(keys))})")
    url = spec.get("url")
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise AgentConfigError(f"agent {name!r}: {kind} needs url: {url_form}, not {url!r}")
    return str(url)
