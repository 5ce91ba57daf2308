"""emoworker produce's feed: posts are keyed by their id, verdicts by their post's id (so that a
verdict lands in its review request's partition), anything else is sent unkeyed and unchanged."""

from __future__ import annotations

from pathlib import Path

from support.verdicts import verdict

from worker.kafka.feed import read_feed


def test_posts_and_verdicts_are_keyed_by_the_post_id(tmp_path: Path) -> None:
    feed = tmp_path / "feed.jsonl"
    lines = [b'{"id": "p1", "text": "hi"}', verdict("p2"), b"{not json", b'{"id": 7}']
    feed.write_bytes(b"\n".join(lines) + b"\n")
    assert read_feed(feed) == [(b"p1", lines[0]), (b"p2", lines[1]), (None, lines[2]),
                               (None, lines[3])]  # fmt: skip
