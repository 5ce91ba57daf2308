"""When and as what a review request is made: its timestamp and its id. Apart from the router so
that the resolver, which names requests too, runs without the inference stack (torch)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def request_id(post_id: str, source: dict[str, Any] | None, requested_at: str) -> str:
    """A review request's id: its input record's coordinates, so that a post processed again
    after a failure asks for the same review; without a source, the post id and the time."""
    if source is not None and "offset" in source:
        return f"{source['topic']}:{source['partition']}:{source['offset']}"
    if source is not None and "line" in source:
        return f"{source['path']}:{source['line']}"
    return f"{post_id}@{requested_at}"
