"""Record headers: which input headers the outputs carry, and the ones every output gets.

A producer's headers (``traceparent``, tenant or correlation ids, content type) go on with the
post: the enriched event, the review request and the dead letter carry the input headers that
``EMOWORKER_HEADERS__PROPAGATE`` names and ``EMOWORKER_HEADERS__DROP`` does not, in their order,
followed by ``content-type: application/json`` and ``schema-version`` (the worker's own, which
replace any input header of those names). With tracing on, ``traceparent`` and ``tracestate`` are
this worker's span instead of the input's (``worker/tracing.py``). Dead letters also keep every
input header in their JSON (base64), so that ``emoworker replay`` restores them.
"""

from __future__ import annotations

import base64
import fnmatch
import re
from collections.abc import Sequence

from schemas import SCHEMA_VERSION, RecordHeader
from worker.settings import HeaderSettings

Header = tuple[str, bytes | None]
Headers = Sequence[Header]

CONTENT_TYPE = "content-type"
SCHEMA_VERSION_HEADER = "schema-version"
TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
MAX_REMEMBERED = 4096  # header names whose decision is remembered
# a list: aiokafka's record builder takes headers as a list only (never mutated)
OWN_HEADERS: list[Header] = [
    (CONTENT_TYPE, b"application/json"),
    (SCHEMA_VERSION_HEADER, SCHEMA_VERSION.encode("ascii")),
]


def _patterns(patterns: list[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p.lower())})" for p in patterns))


class HeaderPolicy:
    """Output headers from input headers. Decisions are remembered per header name (a stream
    repeats a handful of names), so a post costs a lookup per header."""

    def __init__(
        self, settings: HeaderSettings, max_bytes: int, replace_trace: bool = False
    ) -> None:
        """``max_bytes``: the most bytes of input headers an output carries; larger sets are
        left out whole (with the post's free-form fields' limit, an event's size stays known)."""
        self.max_bytes = max_bytes
        self._propagate = _patterns(settings.propagate)
        self._drop = _patterns(settings.drop)
        self._replaced = {CONTENT_TYPE, SCHEMA_VERSION_HEADER}
        if replace_trace:
            self._replaced |= TRACE_HEADERS
        self._kept: dict[str, bool] = {}

    def keeps(self, name: str) -> bool:
        kept = self._kept.get(name)
        if kept is None:
            if len(self._kept) >= MAX_REMEMBERED:  # a producer inventing names: start over
                self._kept.clear()
            lower = name.lower()
            kept = (
                lower not in self._replaced
                and self._propagate is not None
                and self._propagate.fullmatch(lower) is not None
                and (self._drop is None or self._drop.fullmatch(lower) is None)
            )
            self._kept[name] = kept
        return kept

    def outgoing(self, incoming: Headers | None, added: Headers = ()) -> Headers:
        """The headers of a post's outputs: the kept input headers, ``added`` (e.g. this
        worker's trace context), then content type and schema version."""
        if not incoming and not added:
            return OWN_HEADERS
        kept = [h for h in incoming or () if self.keeps(h[0])]
        if kept and headers_size(kept) > self.max_bytes:
            kept = []
        return [*kept, *added, *OWN_HEADERS]


def headers_size(headers: Headers) -> int:
    """Bytes of ``headers`` in a record: names, values and two length varints each."""
    if headers is OWN_HEADERS:  # the usual case (no input headers): measured once
        return _OWN_SIZE
    return sum(len(name) + (len(value) if value else 0) + 2 for name, value in headers)


_OWN_SIZE = sum(len(name) + len(value or b"") + 2 for name, value in OWN_HEADERS)


def encode_headers(headers: Headers) -> list[RecordHeader]:
    """Headers for a dead letter's JSON: values base64, order and repeats kept."""
    return [
        RecordHeader(
            key=name,
            value_base64=None if value is None else base64.b64encode(value).decode("ascii"),
        )
        for name, value in headers
    ]


def decode_headers(headers: Sequence[RecordHeader]) -> list[Header]:
    """The record headers a dead letter kept (raises ``binascii.Error`` for bad base64)."""
    return [
        (h.key, None if h.value_base64 is None else base64.b64decode(h.value_base64, validate=True))
        for h in headers
    ]
