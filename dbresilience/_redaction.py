"""Keeping secrets out of logs, metrics and messages."""

from __future__ import annotations

import re

from sqlalchemy.engine import URL

__all__ = ["mask_url", "redact"]

_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def mask_url(url: URL | str) -> str:
    """``url`` as text with the password replaced by ``***``."""
    if isinstance(url, URL):
        # render_as_string() masks user:password only, not a ?password= in the query.
        return redact(url.render_as_string(hide_password=True))
    return redact(url)


def redact(text: str) -> str:
    """Remove passwords from free text: ``user:pw@host`` URLs and ``password=...`` pairs."""
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    return _KV_PASSWORD.sub(r"\1***", text)
