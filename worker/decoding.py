"""Bytes in, a valid ``SocialPost`` or a clear reason out. Never raises on any input.

The same rules serve the Kafka worker and file mode, so a message that is dead-lettered in one is
dead-lettered in the other with the same kind and message.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from schemas import DeadLetterKind, DeadLetterPayload, SocialPost

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

MAX_NESTING_DEPTH = 32
DROPPED = "_dropped"  # the key of the marker that replaces a free-form field too large to copy


@dataclass(frozen=True)
class DecodeLimits:
    max_message_bytes: int = 1_048_576
    max_text_chars: int = 40_000
    max_nesting_depth: int = MAX_NESTING_DEPTH
    max_passthrough_bytes: int = 65_536

    @classmethod
    def of(cls, settings: WorkerSettings) -> DecodeLimits:
        return cls(
            max_message_bytes=settings.max_message_bytes,
            max_text_chars=settings.max_text_chars,
            max_passthrough_bytes=settings.max_passthrough_bytes,
        )


@dataclass(frozen=True)
class DecodeFailure:
    """Why a message cannot be processed: becomes a dead letter."""

    kind: DeadLetterKind
    message: str
    field: str | None = None


_JSON_TYPE_NAMES = {list: "an array", str: "a string", int: "a number", float: "a number"}
_PYDANTIC_KINDS: dict[str, DeadLetterKind] = {
    "missing": "missing_field",
    "blank_text": "blank_text",
    "unsupported_schema_version": "unsupported_schema_version",
}


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def nesting_depth_exceeds(value: Any, limit: int) -> bool:
    """True when objects/arrays nest deeper than ``limit`` levels (iterative: no recursion)."""
    if isinstance(value, dict) and limit >= 1:  # the usual post: a flat object, checked fast
        for child in value.values():
            if isinstance(child, dict | list):
                break
        else:
            return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _failure_from_validation(error: ValidationError) -> DecodeFailure:
    first = error.errors(include_url=False)[0]
    field = ".".join(str(part) for part in first["loc"]) or None
    kind = _PYDANTIC_KINDS.get(first["type"], "invalid_field")
    if kind == "missing_field":
        message = f"required field '{field}' is missing"
    else:
        message = f"{field}: {first['msg']}" if field else first["msg"]
    extra = error.error_count() - 1
    if extra:
        message += f" (and {extra} more problem{'s' if extra > 1 else ''})"
    return DecodeFailure(kind=kind, message=message, field=field)


def decode_post(value: bytes | None, limits: DecodeLimits) -> SocialPost | DecodeFailure:
    """Validate one message; each failure is a ``DecodeFailure`` with a reason to act on."""
    if value is None:
        return DecodeFailure(
            "tombstone", "the record has no value (a tombstone); nothing to classify"
        )
    if len(value) == 0:
        return DecodeFailure("empty_message", "the message is empty (0 bytes)")
    if len(value) > limits.max_message_bytes:
        return DecodeFailure(
            "message_too_large",
            f"the message is {len(value):,} bytes; the limit is {limits.max_message_bytes:,}",
        )
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        return DecodeFailure(
            "invalid_utf8", f"the message is not valid UTF-8 (byte {exc.start}: {exc.reason})"
        )
    try:
        document = orjson.loads(text.removeprefix("\ufeff"))
    except orjson.JSONDecodeError as exc:
        message = str(exc).lower()
        if "recursion" in message or "depth limit" in message:
            return DecodeFailure(
                "nesting_too_deep", f"JSON nests deeper than {limits.max_nesting_depth} levels"
            )
        return DecodeFailure("invalid_json", f"the message is not valid JSON: {exc}"[:500])
    if not isinstance(document, dict):
        return DecodeFailure(
            "not_an_object",
            f"the message is {_json_type_name(document)}, not a JSON object with id and text",
        )
    if nesting_depth_exceeds(document, limits.max_nesting_depth):
        return DecodeFailure(
            "nesting_too_deep",
            f"JSON nests deeper than {limits.max_nesting_depth} levels",
            field="metadata" if "metadata" in document else None,
        )
    try:
        post = SocialPost.model_validate(document)
    except ValidationError as exc:
        return _failure_from_validation(exc)
    if len(post.text) > limits.max_text_chars:
        return DecodeFailure(
            "text_too_long",
            f"text has {len(post.text):,} characters; the limit is {limits.max_text_chars:,}",
            field="text",
        )
    if len(value) > limits.max_passthrough_bytes:  # only a large message can carry large fields
        bound_free_form_fields(post, limits.max_passthrough_bytes)
    return post


def bound_free_form_fields(post: SocialPost, limit: int) -> None:
    """Keep the copy of a post's free-form fields (``metadata`` and unknown fields) into its
    events under ``limit`` bytes of JSON: while they are larger, the largest is replaced by a
    marker ``{"_dropped": {"size_bytes": ..., "limit_bytes": ...}}``. The text, id and the
    other named fields are bounded by the schema, so every event has a known largest size."""
    fields = {"metadata": post.metadata} if post.metadata is not None else {}
    fields.update(post.model_extra or {})
    sizes = {name: len(orjson.dumps(value)) for name, value in fields.items()}
    total = sum(sizes.values())
    for name in sorted(sizes, key=sizes.__getitem__, reverse=True):
        if total <= limit:
            return
        marker = {DROPPED: {"size_bytes": sizes[name], "limit_bytes": limit}}
        setattr(post, name, marker)  # extra="allow": unknown fields are attributes too
        total += len(orjson.dumps(marker)) - sizes[name]


def payload_for_dead_letter(value: bytes | None, keep_bytes: int) -> DeadLetterPayload:
    """The original message for a dead letter: text when it is UTF-8, else base64; capped."""
    if value is None:
        return DeadLetterPayload(
            encoding="utf-8", data=None, size_bytes=0, truncated=False, sha256=None
        )
    kept = value[:keep_bytes]
    truncated = len(kept) < len(value)
    digest = hashlib.sha256(value).hexdigest()
    text = _utf8_prefix(kept, truncated)
    if text is not None:
        return DeadLetterPayload(
            encoding="utf-8", data=text, size_bytes=len(value), truncated=truncated, sha256=digest
        )
    return DeadLetterPayload(
        encoding="base64",
        data=base64.b64encode(kept).decode("ascii"),
        size_bytes=len(value),
        truncated=truncated,
        sha256=digest,
    )


def _utf8_prefix(kept: bytes, truncated: bool) -> str | None:
    """``kept`` as text when it is UTF-8; a cut may split the last character (up to 3 bytes)."""
    for cut in range(4 if truncated else 1):
        try:
            return kept[: len(kept) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return None
