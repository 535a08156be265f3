"""Tests for trackhouse.query.tokens: opaque, versioned, signed page tokens."""

from __future__ import annotations

import base64
import json
import math

import pytest

from trackhouse.query.errors import InvalidArgument
from trackhouse.query.tokens import VERSION, TokenCodec, fingerprint

SECRET = b"0123456789abcdef0123456789abcdef"


def raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def unraw(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        [1, "a", None, -2.5, 2**62],
        ["ünïcödé ' \" \\ \n", 0.1 + 0.2, 1e-300],
        [],
        [12, 34, 5],
    ],
)
def test_round_trip(cursor: list[object]) -> None:
    codec = TokenCodec(SECRET)
    token = codec.encode("q1", cursor)
    assert codec.decode(token, "q1") == cursor
    # URL-safe and unpadded: a client can put it in a query string as is.
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert raw(token)[0] == VERSION


def test_non_finite_floats_round_trip() -> None:
    # Search cursors carry NaN and ±inf metric values: NaN ranks apart from missing (None).
    codec = TokenCodec(SECRET)
    nan, inf, minus_inf, none = codec.decode(codec.encode("q", [math.nan, math.inf, -math.inf, None]), "q")
    assert math.isnan(nan)
    assert (inf, minus_inf, none) == (math.inf, -math.inf, None)


def test_every_replica_with_the_secret_accepts_the_token() -> None:
    token = TokenCodec(SECRET).encode("q", [1])
    assert TokenCodec(bytes(SECRET)).decode(token, "q") == [1]


def test_another_question_is_refused() -> None:
    codec = TokenCodec(SECRET)
    token = codec.encode("q1", [1])
    with pytest.raises(InvalidArgument, match="belongs to another search"):
        codec.decode(token, "q2")


def test_another_secret_is_refused() -> None:
    token = TokenCodec(b"x" * 16).encode("q", [1])
    with pytest.raises(InvalidArgument, match="signature mismatch"):
        TokenCodec(SECRET).decode(token, "q")


def test_every_single_byte_change_is_refused() -> None:
    codec = TokenCodec(SECRET)
    data = raw(codec.encode("q", [1, "a", 2.5]))
    for i in range(len(data)):
        for flip in (0x01, 0x80):
            changed = bytearray(data)
            changed[i] ^= flip
            with pytest.raises(InvalidArgument, match="page_token: "):
                codec.decode(unraw(bytes(changed)), "q")


def test_forged_payload_is_refused() -> None:
    codec = TokenCodec(SECRET)
    data = raw(codec.encode("q", [1]))
    forged = data[:17] + json.dumps({"q": "q", "c": [999]}, separators=(",", ":")).encode()
    with pytest.raises(InvalidArgument, match="signature mismatch"):
        codec.decode(unraw(forged), "q")


def test_other_version_is_refused() -> None:
    codec = TokenCodec(SECRET)
    data = raw(codec.encode("q", [1]))
    with pytest.raises(InvalidArgument, match="not a page token of this server version"):
        codec.decode(unraw(bytes([VERSION + 1]) + data[1:]), "q")


@pytest.mark.parametrize("token", ["x", "%%%%", "é", "AAAA", "A" * 40, "====", unraw(b"\x01short")])
def test_garbage_is_refused(token: str) -> None:
    with pytest.raises(InvalidArgument, match="page_token: "):
        TokenCodec(SECRET).decode(token, "q")


def test_truncated_token_is_refused() -> None:
    codec = TokenCodec(SECRET)
    token = codec.encode("q", [1, 2, 3])
    for cut in (1, 2, 5, len(token) // 2):
        with pytest.raises(InvalidArgument, match="page_token: "):
            codec.decode(token[:-cut], "q")


@pytest.mark.parametrize("secret", [b"", b"short", b"x" * 15])
def test_short_secret_is_refused(secret: bytes) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        TokenCodec(secret)


def test_fingerprint_tells_questions_apart() -> None:
    base = fingerprint(["1"], "metrics.a > 1", ("metrics.a",), "ACTIVE_ONLY", 7)
    assert base == fingerprint(["1"], "metrics.a > 1", ("metrics.a",), "ACTIVE_ONLY", 7)
    others = [
        fingerprint(["2"], "metrics.a > 1", ("metrics.a",), "ACTIVE_ONLY", 7),
        fingerprint(["1"], "metrics.a > 2", ("metrics.a",), "ACTIVE_ONLY", 7),
        fingerprint(["1"], "metrics.a > 1", ("metrics.a DESC",), "ACTIVE_ONLY", 7),
        fingerprint(["1"], "metrics.a > 1", ("metrics.a",), "ALL", 7),
        fingerprint(["1"], "metrics.a > 1", ("metrics.a",), "ACTIVE_ONLY", 8),
    ]
    assert len({base, *others}) == 6
