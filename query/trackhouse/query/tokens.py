"""Opaque, versioned, tamper-evident page tokens (keyset cursors).

A token carries the sort values of the last row of a page and a fingerprint of
the question it belongs to, signed with HMAC-SHA256 under a secret kept in the
store (so every query replica accepts every other's tokens). A token that was
altered, forged, is of another version, or belongs to another question is
refused with InvalidArgument before anything runs.

    token = base64url( version byte | 16-byte MAC | JSON payload )
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from typing import Any

from trackhouse.query.errors import InvalidArgument

VERSION = 1
_MAC_BYTES = 16


def fingerprint(*parts: Any) -> str:
    """A short digest of what identifies one question (filter, order, scope…)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class TokenCodec:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("page token secret must be at least 16 bytes")
        self._secret = secret

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, bytes([VERSION]) + payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, question: str, cursor: Any) -> str:
        payload = json.dumps({"q": question, "c": cursor}, separators=(",", ":")).encode()
        raw = bytes([VERSION]) + self._mac(payload) + payload
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    def decode(self, token: str, question: str) -> Any:
        """The cursor inside `token`, or InvalidArgument when it is not ours for this question."""
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            raise InvalidArgument("page_token: not a page token (malformed)") from None
        if len(raw) < 1 + _MAC_BYTES or raw[0] != VERSION:
            raise InvalidArgument("page_token: not a page token of this server version")
        mac, payload = raw[1 : 1 + _MAC_BYTES], raw[1 + _MAC_BYTES :]
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise InvalidArgument("page_token: signature mismatch (the token was altered or forged)")
        body = json.loads(payload)
        if body.get("q") != question:
            raise InvalidArgument(
                "page_token: this token belongs to another search (filter, order or scope changed)"
            )
        return body["c"]
