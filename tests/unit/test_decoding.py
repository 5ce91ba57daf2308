"""decode_post: every kind of bad input gets a clear DecodeFailure; good posts come through whole.
payload_for_dead_letter: what a dead letter keeps of the original message."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import SocialPost
from schemas.events import visible_text
from worker.decoding import (
    MAX_NESTING_DEPTH,
    DecodeFailure,
    DecodeLimits,
    decode_post,
    nesting_depth_exceeds,
    payload_for_dead_letter,
)

LIMITS = DecodeLimits()


def post(**fields: Any) -> bytes:
    """A JSON message: a valid post unless ``fields`` override or remove (None value) fields."""
    document: dict[str, Any] = {"id": "p1", "text": "What a lovely day!"}
    for key, value in fields.items():
        if value is _REMOVE:
            document.pop(key, None)
        else:
            document[key] = value
    return json.dumps(document).encode()


_REMOVE = object()


def nested(depth: int) -> dict[str, Any]:
    """An object nesting ``depth`` levels: {"a": {"a": ... {}}}."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def nested_list(depth: int) -> list[Any]:
    """An array nesting ``depth`` levels: [[...[1]...]]."""
    value: list[Any] = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


# (id, message, expected kind or None for a valid post, expected field)
FAILURES: list[tuple[str, bytes | None, str, str | None]] = [
    ("tombstone", None, "tombstone", None),
    ("empty message", b"", "empty_message", None),
    ("invalid JSON", b'{"id": "p1", text: "unquoted key"}', "invalid_json", None),
    ("truncated JSON", b'{"id": "p1", "text": "hel', "invalid_json", None),
    ("trailing garbage", post() + b" and more", "invalid_json", None),
    ("NaN", b'{"id": "p1", "text": "x", "score": NaN}', "invalid_json", None),
    ("lone surrogate escape", b'{"id": "p1", "text": "a\\ud800b"}', "invalid_json", None),
    ("only white space", b"   \n ", "invalid_json", None),
    ("latin-1 bytes", b'{"id": "p1", "text": "caf\xe9"}', "invalid_utf8", None),
    ("UTF-16 with BOM", '{"id": "p1", "text": "x"}'.encode("utf-16"), "invalid_utf8", None),
    ("lone continuation byte", b"\x80", "invalid_utf8", None),
    ("JSON array", b'[{"id": "p1", "text": "x"}]', "not_an_object", None),
    ("JSON number", b"42", "not_an_object", None),
    ("JSON float", b"1.5", "not_an_object", None),
    ("JSON string", b'"just a string"', "not_an_object", None),
    ("JSON null", b"null", "not_an_object", None),
    ("JSON true", b"true", "not_an_object", None),
    ("JSON false", b"false", "not_an_object", None),
    ("missing text", post(text=_REMOVE), "missing_field", "text"),
    ("empty object", b"{}", "missing_field", "id"),
    ("blank text", post(text="  \t\n "), "blank_text", "text"),
    ("empty text", post(text=""), "blank_text", "text"),
    ("zero-width only text", post(text="\u200b\u200d\ufeff"), "blank_text", "text"),
    ("NUL only text", post(text="\x00\x01"), "blank_text", "text"),
    ("number text", post(text=42), "invalid_field", "text"),
    ("null text", post(text=None), "invalid_field", "text"),
    ("list text", post(text=["a"]), "invalid_field", "text"),
    ("missing id", post(id=_REMOVE), "missing_field", "id"),
    ("number id", post(id=17), "invalid_field", "id"),
    ("null id", post(id=None), "invalid_field", "id"),
    ("empty id", post(id=""), "invalid_field", "id"),
    ("blank id", post(id="   "), "invalid_field", "id"),
    ("zero-width id", post(id="\u200b"), "invalid_field", "id"),
    ("id too long", post(id="x" * 513), "invalid_field", "id"),
    ("text too long", post(text="a" * 40_001), "text_too_long", "text"),
    ("schema version 2", post(schema_version="2"), "unsupported_schema_version", "schema_version"),
    (
        "schema version 2.1",
        post(schema_version="2.1"),
        "unsupported_schema_version",
        "schema_version",
    ),
    ("schema version number", post(schema_version=1.3), "invalid_field", "schema_version"),
    ("created_at not a date", post(created_at="yesterday"), "invalid_field", "created_at"),
    ("created_at US style", post(created_at="02/01/2024 10:00"), "invalid_field", "created_at"),
    ("created_at month 13", post(created_at="2024-13-02T03:04:05Z"), "invalid_field", "created_at"),
    (
        "created_at without timezone",
        post(created_at="2024-01-02T03:04:05"),
        "invalid_field",
        "created_at",
    ),
    ("created_at date only", post(created_at="2024-01-02"), "invalid_field", "created_at"),
    ("metadata not an object", post(metadata=[1, 2]), "invalid_field", "metadata"),
    ("author not a string", post(author=5), "invalid_field", "author"),
    ("metadata depth 40", post(metadata=nested(40)), "nesting_too_deep", "metadata"),
    ("array nesting depth 40", post(extra=nested_list(40)), "nesting_too_deep", None),
    (
        "message over the byte limit",
        b"x" * (LIMITS.max_message_bytes + 1),
        "message_too_large",
        None,
    ),
]


@pytest.mark.parametrize(
    ("value", "kind", "field"),
    [pytest.param(v, k, f, id=name) for name, v, k, f in FAILURES],
)
def test_bad_messages_are_rejected_with_a_reason(
    value: bytes | None, kind: str, field: str | None
) -> None:
    result = decode_post(value, LIMITS)
    assert isinstance(result, DecodeFailure), result
    assert result.kind == kind, result.message
    assert result.field == field
    assert result.message.strip()


def test_missing_field_message_names_the_field() -> None:
    result = decode_post(post(text=_REMOVE), LIMITS)
    assert isinstance(result, DecodeFailure)
    assert result.message == "required field 'text' is missing"


def test_several_problems_are_counted_in_the_message() -> None:
    result = decode_post(b"{}", LIMITS)
    assert isinstance(result, DecodeFailure)
    assert result.message.endswith("(and 1 more problem)")


def test_not_an_object_message_names_the_json_type() -> None:
    for value, name in [(b"[1]", "an array"), (b"3", "a number"), (b"null", "null")]:
        result = decode_post(value, LIMITS)
        assert isinstance(result, DecodeFailure)
        assert f"the message is {name}," in result.message


# (id, message, expected text)
VALID: list[tuple[str, bytes, str]] = [
    ("plain", post(), "What a lovely day!"),
    ("emoji only", post(text="😀🎉❤️"), "😀🎉❤️"),
    ("flag and skin tone emoji", post(text="🇫🇷👍🏽"), "🇫🇷👍🏽"),
    (
        "control characters inside",
        post(text="hello\x07 wor\x00ld\x1b!"),
        "hello\x07 wor\x00ld\x1b!",
    ),
    ("right-to-left override", post(text="abc\u202edcba\u202c ok"), "abc\u202edcba\u202c ok"),
    ("mixed scripts", post(text="Hello мир 世界 مرحبا שלום"), "Hello мир 世界 مرحبا שלום"),
    ("combining marks", post(text="e\u0301\u0301"), "e\u0301\u0301"),
    ("zero-width around a letter", post(text="\u200bx\u200d"), "\u200bx\u200d"),
    ("UTF-8 BOM prefix", b"\xef\xbb\xbf" + post(), "What a lovely day!"),
    ("raw UTF-8 text", '{"id": "p1", "text": "naïve café ☕"}'.encode(), "naïve café ☕"),
    ("text at the limit", post(text="a" * 40_000), "a" * 40_000),
    ("schema version 1.3", post(schema_version="1.3"), "What a lovely day!"),
    ("schema version 1", post(schema_version="1"), "What a lovely day!"),
    ("metadata depth 10", post(metadata=nested(10)), "What a lovely day!"),
    ("created_at UTC", post(created_at="2024-01-02T03:04:05Z"), "What a lovely day!"),
    ("created_at offset", post(created_at="2024-01-02T03:04:05.25+02:00"), "What a lovely day!"),
    ("null optional fields", post(author=None, lang=None, metadata=None), "What a lovely day!"),
    ("white space around text", post(text="  hi  \n"), "  hi  \n"),
]


@pytest.mark.parametrize(("value", "text"), [pytest.param(v, t, id=name) for name, v, t in VALID])
def test_valid_posts_come_through_unchanged(value: bytes, text: str) -> None:
    result = decode_post(value, LIMITS)
    assert isinstance(result, SocialPost), result
    assert result.id == "p1"
    assert result.text == text
    assert result.schema_version.startswith("1")
    # what the router will do with it: serialise as JSON
    assert orjson.loads(orjson.dumps(result.model_dump(mode="json")))["text"] == text


def test_unknown_fields_are_kept_in_model_extra() -> None:
    value = post(reactions={"like": 3, "angry": [1, 2]}, subreddit="r/test", score=1.5)
    result = decode_post(value, LIMITS)
    assert isinstance(result, SocialPost)
    assert result.model_extra == {
        "reactions": {"like": 3, "angry": [1, 2]},
        "subreddit": "r/test",
        "score": 1.5,
    }
    dumped = result.model_dump(mode="json")
    assert dumped["subreddit"] == "r/test"
    assert dumped["reactions"] == {"like": 3, "angry": [1, 2]}


def test_known_optional_fields_are_parsed() -> None:
    value = post(
        author="u/someone",
        platform="reddit",
        lang="en",
        created_at="2024-01-02T03:04:05+02:00",
        metadata={"thread": "abc", "depth": 2},
    )
    result = decode_post(value, LIMITS)
    assert isinstance(result, SocialPost)
    assert result.author == "u/someone"
    assert result.platform == "reddit"
    assert result.created_at is not None and result.created_at.utcoffset() is not None
    assert result.created_at.isoformat() == "2024-01-02T03:04:05+02:00"
    assert result.metadata == {"thread": "abc", "depth": 2}
    assert result.model_extra == {}


@pytest.mark.parametrize("created_at", [1_700_000_000, "1700000000"], ids=["number", "digits"])
def test_created_at_as_a_unix_timestamp_is_not_rfc3339(created_at: object) -> None:
    result = decode_post(post(created_at=created_at), LIMITS)
    assert isinstance(result, DecodeFailure)
    assert result.kind == "invalid_field"


def test_text_limit_is_configurable() -> None:
    limits = DecodeLimits(max_text_chars=10)
    assert isinstance(decode_post(post(text="a" * 10), limits), SocialPost)
    result = decode_post(post(text="a" * 11), limits)
    assert isinstance(result, DecodeFailure)
    assert result.kind == "text_too_long"
    assert "11 characters" in result.message


def test_emoji_count_as_characters_not_bytes_for_the_text_limit() -> None:
    limits = DecodeLimits(max_text_chars=4)
    assert isinstance(decode_post(post(text="😀😀😀😀"), limits), SocialPost)  # 16 bytes


def test_message_over_the_byte_limit_is_rejected_before_parsing() -> None:
    huge = b"[" * 10_000_000  # would be a nesting disaster if it were parsed
    started = time.perf_counter()
    result = decode_post(huge, LIMITS)
    elapsed = time.perf_counter() - started
    assert isinstance(result, DecodeFailure)
    assert result.kind == "message_too_large"
    assert "10,000,000 bytes" in result.message
    assert elapsed < 0.5  # no decoding or parsing of 10 MB (the kind proves the order)


def test_message_at_the_byte_limit_is_parsed() -> None:
    value = post()
    assert isinstance(decode_post(value, DecodeLimits(max_message_bytes=len(value))), SocialPost)
    result = decode_post(value, DecodeLimits(max_message_bytes=len(value) - 1))
    assert isinstance(result, DecodeFailure) and result.kind == "message_too_large"


@pytest.mark.parametrize("depth", [MAX_NESTING_DEPTH, MAX_NESTING_DEPTH + 1])
def test_nesting_limit_boundary(depth: int) -> None:
    # the document itself is level 1, metadata level 2: metadata of depth d makes d + 1 levels
    result = decode_post(post(metadata=nested(depth - 1)), LIMITS)
    if depth <= MAX_NESTING_DEPTH:
        assert isinstance(result, SocialPost)
    else:
        assert isinstance(result, DecodeFailure) and result.kind == "nesting_too_deep"


def test_nesting_depth_exceeds() -> None:
    assert not nesting_depth_exceeds({"a": [1, {"b": 2}]}, 3)
    assert nesting_depth_exceeds({"a": [1, {"b": {}}]}, 3)
    assert not nesting_depth_exceeds("scalar", 0)
    assert nesting_depth_exceeds(nested(100_000), 32), "iterative: no RecursionError"


def test_nesting_beyond_the_parsers_limit_is_nesting_too_deep() -> None:
    result = decode_post(
        b'{"id": "p1", "text": "x", "m": ' + b"[" * 5000 + b"]" * 5000 + b"}", LIMITS
    )
    assert isinstance(result, DecodeFailure)
    assert result.kind == "nesting_too_deep"


# -- payload_for_dead_letter -----------------------------------------------------------------------


def test_text_payload_is_kept_as_utf8() -> None:
    value = '{"id": 1, "text": "héllo"}'.encode()
    payload = payload_for_dead_letter(value, 65_536)
    assert payload.encoding == "utf-8"
    assert payload.data == '{"id": 1, "text": "héllo"}'
    assert payload.size_bytes == len(value)
    assert not payload.truncated
    assert payload.sha256 == hashlib.sha256(value).hexdigest()


def test_binary_payload_is_base64() -> None:
    value = b"\xff\xfe\x00binary\x80"
    payload = payload_for_dead_letter(value, 65_536)
    assert payload.encoding == "base64"
    assert payload.data is not None and base64.b64decode(payload.data) == value
    assert payload.size_bytes == len(value)
    assert not payload.truncated
    assert payload.sha256 == hashlib.sha256(value).hexdigest()


def test_truncated_binary_payload_is_base64_of_the_kept_bytes() -> None:
    value = b"\xff" * 100
    payload = payload_for_dead_letter(value, 10)
    assert payload.encoding == "base64"
    assert payload.data is not None and base64.b64decode(payload.data) == b"\xff" * 10
    assert payload.truncated
    assert payload.size_bytes == 100
    assert payload.sha256 == hashlib.sha256(value).hexdigest()


def test_tombstone_payload_is_empty() -> None:
    payload = payload_for_dead_letter(None, 100)
    assert payload.data is None and payload.sha256 is None
    assert payload.size_bytes == 0 and not payload.truncated


TEXT = "a€b😀cé"  # 1 + 3 + 1 + 4 + 1 + 2 = 12 bytes


@pytest.mark.parametrize("keep", range(len(TEXT.encode()) + 2))
def test_truncation_keeps_a_valid_utf8_prefix(keep: int) -> None:
    value = TEXT.encode()
    payload = payload_for_dead_letter(value, keep)
    assert payload.encoding == "utf-8"
    assert payload.data is not None
    assert TEXT.startswith(payload.data)
    kept = len(payload.data.encode())
    assert kept <= keep
    assert kept >= min(keep, len(value)) - 3, "at most one partial character is dropped"
    assert payload.truncated == (keep < len(value))
    assert payload.size_bytes == len(value)
    assert payload.sha256 == hashlib.sha256(value).hexdigest()


def test_truncation_inside_a_multibyte_character() -> None:
    value = ("x" + "😀" * 10).encode()  # 41 bytes
    payload = payload_for_dead_letter(value, 7)  # "x", one emoji, 2 bytes of the next
    assert payload.encoding == "utf-8"
    assert payload.data == "x😀"
    assert payload.truncated


# -- fuzzing ---------------------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
POST_LIKE = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=10) | st.text(min_size=1, max_size=3) | JSON_SCALARS,
        "text": st.text(min_size=1, max_size=40) | st.text(max_size=3) | JSON_SCALARS,
    },
    optional={
        "schema_version": st.sampled_from(["1", "1.0", "1.9", "2", "", "x"]) | JSON_SCALARS,
        "created_at": st.sampled_from(["2024-01-02T03:04:05Z", "2024-01-02", "now", None])
        | JSON_SCALARS,
        "metadata": st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3) | JSON_VALUES,
        "author": st.text(max_size=10) | JSON_SCALARS,
        "extra": JSON_VALUES,
    },
)

# mostly valid posts with random texts, ids and unknown fields: exercises the success path
NEARLY_VALID = st.fixed_dictionaries(
    {"id": st.text(min_size=1, max_size=10), "text": st.text(min_size=1, max_size=60)},
    optional={
        "schema_version": st.sampled_from(["1", "1.0", "1.7"]),
        "created_at": st.sampled_from(["2024-01-02T03:04:05Z", "2024-05-06T07:08:09.5+05:30"]),
        "metadata": st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3),
        "author": st.text(max_size=10),
        "lang": st.none() | st.text(max_size=5),
        "extra": JSON_VALUES,
    },
)
DOCUMENTS = st.one_of(JSON_VALUES, POST_LIKE, NEARLY_VALID)


def check_decoded(result: object) -> None:
    assert isinstance(result, SocialPost | DecodeFailure), type(result)
    if isinstance(result, DecodeFailure):
        assert isinstance(result.message, str) and result.message.strip()
        return
    assert isinstance(result.id, str) and result.id and visible_text(result.id)
    assert isinstance(result.text, str) and visible_text(result.text)
    assert len(result.text) <= LIMITS.max_text_chars
    orjson.dumps(result.model_dump(mode="json"))  # the router can serialise it


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(value: bytes) -> None:
    check_decoded(decode_post(value, LIMITS))


@settings(max_examples=300, deadline=None)
@given(DOCUMENTS)
def test_fuzz_json_documents(document: Any) -> None:
    value = json.dumps(document).encode()
    result = decode_post(value, LIMITS)
    check_decoded(result)
    if isinstance(result, SocialPost):
        assert isinstance(document, dict)
        assert result.id == document["id"] and result.text == document["text"]


@settings(max_examples=300, deadline=None)
@given(POST_LIKE | NEARLY_VALID, st.integers(min_value=0, max_value=400))
def test_fuzz_truncated_json_documents(document: dict[str, Any], cut: int) -> None:
    value = json.dumps(document, ensure_ascii=False).encode()[:cut]
    check_decoded(decode_post(value, LIMITS))
