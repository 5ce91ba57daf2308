"""Verdicts meet their review requests: the resolver's state and rules, without Kafka.

State is per partition (the review, verdicts and changelog topics are co-partitioned by post id)
and per post id, one ``Entry``: a pending review request, a verdict waiting for its request, or
the marker of a resolved one. Every change to an entry is also a changelog record (its key the
post id, its value the entry as JSON, or a tombstone), written in the same transaction as the
outputs it causes, so that a restarted or new owner of the partition rebuilds exactly this state.

The rules, for a record of partition ``p``:

* review request: kept pending (a newer request for the post replaces it); a verdict that was
  waiting for it resolves it at once; the same request again (a post processed twice) is a no-op;
* old entries: a request unanswered for ``request_ttl_s`` and the marker of a post resolved
  ``keep_resolved_s`` ago are forgotten (a tombstone in the changelog);
* verdict: resolves the pending request (one ``FinalPost``, the entry becomes a resolved marker;
  a final event larger than its topic accepts is an ``output_too_large`` dead letter instead);
  without a request it waits (``verdict_wait_s``, then it is dead-lettered as ``unknown_post``);
  the same verdict again is a no-op; a different verdict for a resolved request, a verdict that
  names another request, labels the model does not have, or a malformed verdict go to the dead
  letters with the reason.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from pydantic import ValidationError

from schemas import DeadLetterKind, ReviewVerdict
from worker.decoding import payload_for_dead_letter
from worker.kafka.topic_limits import TopicLimits
from worker.routing.request_ids import now_rfc3339
from worker.routing.request_ids import request_id as make_request_id

Sink = Literal["final", "dead_letter", "state"]


@dataclass(frozen=True)
class Output:
    """A record to publish: ``sink`` names the topic; ``state`` records go to the changelog's
    partition of the same number as the input."""

    sink: Sink
    key: bytes
    value: bytes | None


@dataclass
class Entry:
    request: dict[str, Any] | None = None  # the pending review request (JSON)
    verdict: dict[str, Any] | None = None  # a verdict waiting for its request (JSON)
    verdict_source: dict[str, Any] | None = None
    since: float | None = None  # unix seconds: when the entry took its state
    resolved: dict[str, Any] | None = None  # {"request_id", "digest"} once resolved

    def to_json(self) -> bytes:
        return orjson.dumps({k: v for k, v in self.__dict__.items() if v is not None})

    @classmethod
    def from_json(cls, value: bytes) -> Entry:
        return cls(**orjson.loads(value))


@dataclass
class Outcome:
    """What one record did: its outputs and a word for the metrics and logs."""

    kind: str  # pending, resolved, waiting, duplicate, dead_letter, expired
    outputs: list[Output] = field(default_factory=list)


def verdict_digest(verdict: dict[str, Any]) -> str:
    """Identifies a verdict's content (the same verdict sent twice has the same digest)."""
    return hashlib.sha256(orjson.dumps(verdict, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


class ResolveState:
    def __init__(
        self,
        resolver_id: str,
        verdict_wait_s: float,
        request_ttl_s: float = 30 * 86400,
        keep_resolved_s: float = 7 * 86400,
        limits: TopicLimits | None = None,
        final_topic: str = "posts.final",
    ) -> None:
        """``limits``: the output topics' record limits (a final event too large for
        ``final_topic`` becomes an ``output_too_large`` dead letter, as in the worker)."""
        self.resolver_id = resolver_id
        self.verdict_wait_s = verdict_wait_s
        self.request_ttl_s = request_ttl_s
        self.keep_resolved_s = keep_resolved_s
        self.limits = limits or TopicLimits()
        self.final_topic = final_topic
        self.partitions: dict[int, dict[str, Entry]] = {}

    # ── ownership ───────────────────────────────────────────────────────────────────────────

    def restore(self, partition: int, records: list[tuple[bytes, bytes | None]]) -> None:
        """The partition's state from its changelog records, oldest first."""
        entries: dict[str, Entry] = {}
        for key, value in records:
            if value is None:
                entries.pop(key.decode(), None)
            else:
                entries[key.decode()] = Entry.from_json(value)
        self.partitions[partition] = entries

    def drop(self, partition: int) -> None:
        self.partitions.pop(partition, None)

    def pending_requests(self) -> int:
        return sum(e.request is not None for p in self.partitions.values() for e in p.values())

    def waiting_verdicts(self) -> int:
        return sum(e.verdict is not None for p in self.partitions.values() for e in p.values())

    # ── records ─────────────────────────────────────────────────────────────────────────────

    def on_request(
        self, partition: int, value: bytes | None, source: dict[str, Any], now: float
    ) -> Outcome:
        request = _decode_request(value)
        if isinstance(request, str):
            return self._dead_letter("invalid_field", request, value, source, None)
        post_id = request["id"]
        # a request from a worker before 1.4 has none: the id the worker gives it now
        post_source = request.get("source") if isinstance(request.get("source"), dict) else None
        request_id = request.get("request_id") or make_request_id(
            post_id, post_source, request["requested_at"]
        )
        request["request_id"] = request_id
        entries = self.partitions.setdefault(partition, {})
        entry = entries.get(post_id)
        if entry is not None and entry.resolved and entry.resolved["request_id"] == request_id:
            return Outcome("duplicate")
        if entry is not None and entry.request and entry.request["request_id"] == request_id:
            return Outcome("duplicate")
        if entry is not None and entry.verdict is not None:
            verdict, verdict_source = entry.verdict, entry.verdict_source or {}
            if verdict.get("request_id") not in (None, request_id):
                out = self._dead_letter(
                    "request_mismatch",
                    f"the verdict names request {verdict['request_id']!r}; the post's request "
                    f"is {request_id!r}",
                    orjson.dumps(verdict),
                    verdict_source,
                    post_id,
                )
                entry = Entry(request=request, since=now)
                entries[post_id] = entry
                out.outputs.append(_state(post_id, entry))
                return out
            return self._resolve(entries, post_id, request, verdict, verdict_source, now)
        entry = Entry(request=request, since=now)
        entries[post_id] = entry
        return Outcome("pending", [_state(post_id, entry)])

    def on_verdict(
        self, partition: int, value: bytes | None, source: dict[str, Any], now: float
    ) -> Outcome:
        verdict = _decode_verdict(value)
        if isinstance(verdict, tuple):
            kind, message = verdict
            return self._dead_letter(kind, message, value, source, None)
        post_id = verdict["post_id"]
        entries = self.partitions.setdefault(partition, {})
        entry = entries.get(post_id)
        digest = verdict_digest(verdict)
        if entry is not None and entry.resolved is not None:
            if entry.resolved["digest"] == digest:
                return Outcome("duplicate")
            return self._dead_letter(
                "already_resolved",
                f"post {post_id!r} was resolved by an earlier verdict "
                f"(request {entry.resolved['request_id']!r}); a later verdict does not change it",
                value,
                source,
                post_id,
            )
        if entry is not None and entry.request is not None:
            request = entry.request
            if verdict.get("request_id") not in (None, request["request_id"]):
                return self._dead_letter(
                    "request_mismatch",
                    f"the verdict names request {verdict['request_id']!r}; the post's pending "
                    f"request is {request['request_id']!r}",
                    value,
                    source,
                    post_id,
                )
            return self._resolve(entries, post_id, request, verdict, source, now)
        if entry is not None and entry.verdict is not None:
            if verdict_digest(entry.verdict) == digest:
                return Outcome("duplicate")
            return self._dead_letter(
                "already_resolved",
                f"another verdict for post {post_id!r} is already waiting for its request",
                value,
                source,
                post_id,
            )
        entry = Entry(verdict=verdict, verdict_source=source, since=now)
        entries[post_id] = entry
        return Outcome("waiting", [_state(post_id, entry)])

    def expire(self, now: float) -> list[tuple[int, Outcome]]:
        """Entries past their time, with their partitions: a verdict that waited
        ``verdict_wait_s`` for a request that never came (dead letter ``unknown_post``); a
        request nobody answered within ``request_ttl_s`` and a resolved marker older than
        ``keep_resolved_s`` (forgotten: the changelog does not grow without end)."""
        out: list[tuple[int, Outcome]] = []
        for partition, entries in self.partitions.items():
            for post_id, entry in list(entries.items()):
                age = now - (entry.since if entry.since is not None else now)
                if entry.verdict is not None and age >= self.verdict_wait_s:
                    outcome = self._dead_letter(
                        "unknown_post",
                        f"no review request for post {post_id!r} arrived within "
                        f"{self.verdict_wait_s:g} s of its verdict",
                        orjson.dumps(entry.verdict),
                        entry.verdict_source or {},
                        post_id,
                    )
                    outcome.kind = "expired"
                elif entry.request is not None and age >= self.request_ttl_s:
                    outcome = Outcome("unanswered")
                elif entry.resolved is not None and age >= self.keep_resolved_s:
                    outcome = Outcome("forgotten")
                else:
                    continue
                del entries[post_id]
                outcome.outputs.append(Output("state", post_id.encode(), None))
                out.append((partition, outcome))
        return out

    # ── outcomes ────────────────────────────────────────────────────────────────────────────

    def _resolve(
        self,
        entries: dict[str, Entry],
        post_id: str,
        request: dict[str, Any],
        verdict: dict[str, Any],
        verdict_source: dict[str, Any],
        now: float,
    ) -> Outcome:
        known = {e["label"] for e in request.get("emotions", [])}
        unknown = [label for label in verdict["labels"] if label not in known]
        if unknown:
            return self._reject_keeping_request(
                entries, post_id, request, verdict, verdict_source, now, "unknown_label",
                f"labels {unknown} are not among the model's {len(known)} labels",
            )  # fmt: skip
        final = orjson.dumps(final_post(request, verdict, self.resolver_id))
        size = self.limits.record_bytes(post_id.encode(), final, ())
        limit = self.limits.limit_of(self.final_topic)
        if limit is not None and size > limit:  # never sent: it would stop the resolver for good
            return self._reject_keeping_request(
                entries, post_id, request, verdict, verdict_source, now, "output_too_large",
                f"the final event is {size} bytes and topic {self.final_topic!r} accepts "
                f"{limit} (max.message.bytes)",
            )  # fmt: skip
        entry = Entry(
            resolved={"request_id": request["request_id"], "digest": verdict_digest(verdict)},
            since=now,
        )
        entries[post_id] = entry
        return Outcome(
            "resolved", [Output("final", post_id.encode(), final), _state(post_id, entry)]
        )

    def _reject_keeping_request(
        self,
        entries: dict[str, Entry],
        post_id: str,
        request: dict[str, Any],
        verdict: dict[str, Any],
        verdict_source: dict[str, Any],
        now: float,
        kind: DeadLetterKind,
        message: str,
    ) -> Outcome:
        """The verdict as a dead letter; its request stays pending (a corrected verdict may
        still come)."""
        out = self._dead_letter(kind, message, orjson.dumps(verdict), verdict_source, post_id)
        entries[post_id] = Entry(request=request, since=now)
        out.outputs.append(_state(post_id, entries[post_id]))
        return out

    def _dead_letter(
        self,
        kind: DeadLetterKind,
        message: str,
        value: bytes | None,
        source: dict[str, Any],
        post_id: str | None,
    ) -> Outcome:
        letter = {
            "schema_version": "1.4",
            "error": {"kind": kind, "message": message, "field": None},
            "source": source,
            "key_base64": None,
            "payload": payload_for_dead_letter(value, 65_536).model_dump(mode="json"),
            "failed_at": now_rfc3339(),
            "worker_id": self.resolver_id,
        }
        key = (post_id or "").encode()
        return Outcome("dead_letter", [Output("dead_letter", key, orjson.dumps(letter))])


def final_post(
    request: dict[str, Any], verdict: dict[str, Any], resolver_id: str
) -> dict[str, Any]:
    """The ``FinalPost`` of a request and its verdict, as JSON-ready data."""
    labelled = verdict["outcome"] == "labelled"
    model_labels = list(request.get("predicted_labels", []))
    return {
        "schema_version": "1.4",
        "id": request["id"],
        "post": request["post"],
        "labels": list(verdict["labels"]),
        "outcome": verdict["outcome"],
        "decided_by": verdict["reviewer_id"],
        "decided_at": verdict["decided_at"],
        "seconds_spent": verdict.get("seconds_spent"),
        "note": verdict.get("note"),
        "model_labels": model_labels,
        "model_agreed": set(model_labels) == set(verdict["labels"]) if labelled else None,
        "emotions": request["emotions"],
        "uncertainty": request["uncertainty"],
        "review_reasons": request["reasons"],
        "review_score": request["review_score"],
        "model": request["model"],
        "request_id": request["request_id"],
        "requested_at": request["requested_at"],
        "resolved_at": now_rfc3339(),
        "resolver_id": resolver_id,
        "source": request.get("source"),
    }


def _state(post_id: str, entry: Entry) -> Output:
    return Output("state", post_id.encode(), entry.to_json())


REQUIRED_REQUEST_FIELDS = ("id", "post", "emotions", "predicted_labels", "uncertainty", "model")


def _decode_request(value: bytes | None) -> dict[str, Any] | str:
    """A review request as data, or why it cannot be one (the worker wrote it: a check of the
    fields the final event needs is enough)."""
    try:
        request = orjson.loads(value or b"")
    except orjson.JSONDecodeError as exc:
        return f"review request is not JSON: {exc}"
    if not isinstance(request, dict):
        return "review request is not a JSON object"
    missing = [f for f in REQUIRED_REQUEST_FIELDS if f not in request]
    if missing or not isinstance(request.get("id"), str):
        return f"review request without {', '.join(missing) or 'a string id'}"
    request.setdefault("reasons", [])
    request.setdefault("review_score", 0.0)
    request.setdefault("requested_at", now_rfc3339())
    return request


def _decode_verdict(value: bytes | None) -> dict[str, Any] | tuple[DeadLetterKind, str]:
    if value is None:
        return "tombstone", "a verdict record without a value"
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return "invalid_json", f"not JSON: {exc}"
    if not isinstance(doc, dict):
        return "not_an_object", "a verdict is a JSON object"
    try:
        verdict = ReviewVerdict.model_validate(doc)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        kind: DeadLetterKind = "missing_field" if first["type"] == "missing" else "invalid_field"
        return kind, f"{where + ': ' if where else ''}{first['msg']}"
    return verdict.model_dump(mode="json")
