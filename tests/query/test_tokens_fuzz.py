"""Property tests for trackhouse.query.tokens: what is not ours is refused cleanly, ours round-trips.

Random strings, random bytes (base64url-encoded so they reach the MAC check) and
valid tokens with bytes flipped, cut or appended are all refused with
InvalidArgument naming page_token — never another exception, never a cursor.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trackhouse.query.errors import InvalidArgument
from trackhouse.query.tokens import TokenCodec

SECRET = b"0123456789abcdef0123456789abcdef"
CODEC = TokenCodec(SECRET)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64),
                         st.floats(allow_nan=False), st.text(max_size=30))
cursors = st.lists(json_scalars, max_size=6)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _raw(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def _refused(token: str, question: str = "q") -> None:
    with pytest.raises(InvalidArgument, match="page_token"):
        CODEC.decode(token, question)


@given(st.text(max_size=200))
def test_random_text_is_refused(token: str) -> None:
    _refused(token)


@given(st.binary(max_size=300))
def test_random_bytes_are_refused(data: bytes) -> None:
    _refused(_b64(data))
    _refused(_b64(b"\x01" + data))  # right version byte, forged MAC


@given(cursors, st.text(max_size=20))
def test_valid_tokens_round_trip(cursor: list[Any], question: str) -> None:
    assert CODEC.decode(CODEC.encode(question, cursor), question) == cursor


@given(cursors, st.data())
def test_mutated_tokens_are_refused(cursor: list[Any], data: st.DataObject) -> None:
    raw = bytearray(_raw(CODEC.encode("q", cursor)))
    mutation = data.draw(st.sampled_from(["flip", "cut", "append", "splice"]))
    if mutation == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif mutation == "cut":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif mutation == "append":
        raw += data.draw(st.binary(min_size=1, max_size=20))
    else:  # another valid token's payload under this one's MAC
        other = _raw(CODEC.encode("q", [*cursor, 1]))
        raw = raw[:17] + bytearray(other[17:])
    _refused(_b64(bytes(raw)))


@given(cursors, st.text(max_size=20), st.text(max_size=20))
def test_a_token_of_another_question_or_secret_is_refused(cursor: list[Any], q1: str, q2: str) -> None:
    if q1 != q2:
        _refused(CODEC.encode(q1, cursor), q2)
    _refused(TokenCodec(b"another secret of 32 bytes......").encode(q1, cursor), q1)
