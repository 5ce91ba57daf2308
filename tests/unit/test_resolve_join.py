"""The resolver's join rules without Kafka: a verdict resolves its request once, whatever the
order; duplicates are no-ops; bad verdicts are dead letters with their reason; state survives
being rebuilt from its own changelog records."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from support.verdicts import review_request as request
from support.verdicts import verdict

from schemas import DeadLetter, FinalPost, ReviewRequest, ReviewVerdict
from worker.resolve.join import Outcome, ResolveState

SRC = {"topic": "posts.verdicts", "partition": 0, "offset": 1}


def finals(outcome: Outcome) -> list[dict[str, Any]]:
    return [orjson.loads(o.value or b"") for o in outcome.outputs if o.sink == "final"]


def dead_letter(outcome: Outcome) -> DeadLetter:
    (letter,) = [o for o in outcome.outputs if o.sink == "dead_letter"]
    return DeadLetter.model_validate_json(letter.value or b"")


@pytest.fixture
def state() -> ResolveState:
    return ResolveState("resolver-1", verdict_wait_s=60)


def test_a_verdict_after_its_request_publishes_one_valid_final_event(state: ResolveState) -> None:
    ReviewRequest.model_validate_json(request("p1"))  # the worker's shape
    assert state.on_request(0, request("p1"), {}, 0).kind == "pending"
    assert state.pending_requests() == 1
    outcome = state.on_verdict(0, verdict("p1", ["joy", "anger"], seconds_spent=12.5), SRC, 1)
    assert outcome.kind == "resolved"
    (final,) = finals(outcome)
    event = FinalPost.model_validate(final)
    assert (event.id, event.labels, event.decided_by) == ("p1", ["joy", "anger"], "alice")
    assert event.model_labels == ["joy"] and event.model_agreed is False
    assert event.request_id == "posts:0:5" and event.seconds_spent == 12.5
    assert event.model.revision == "abc" and event.resolver_id == "resolver-1"
    assert state.pending_requests() == 0


def test_model_agreed_when_the_reviewer_chose_its_labels(state: ResolveState) -> None:
    state.on_request(0, request("p1", predicted=("joy", "admiration")), {}, 0)
    (final,) = finals(state.on_verdict(0, verdict("p1", ["admiration", "joy"]), SRC, 1))
    assert final["model_agreed"] is True


def test_a_verdict_before_its_request_waits_then_resolves(state: ResolveState) -> None:
    assert state.on_verdict(0, verdict("p1"), SRC, 0).kind == "waiting"
    assert state.waiting_verdicts() == 1
    outcome = state.on_request(0, request("p1"), {}, 5)
    assert outcome.kind == "resolved" and len(finals(outcome)) == 1
    assert state.waiting_verdicts() == 0


def test_a_verdict_that_waits_too_long_is_dead_lettered_as_unknown_post(
    state: ResolveState,
) -> None:
    state.on_verdict(0, verdict("ghost"), SRC, 0)
    assert state.expire(59) == []
    ((partition, outcome),) = state.expire(61)
    assert partition == 0 and outcome.kind == "expired"
    assert dead_letter(outcome).error.kind == "unknown_post"
    assert dead_letter(outcome).source.model_dump()["offset"] == 1  # the verdict's record
    assert [o.value for o in outcome.outputs if o.sink == "state"] == [None]  # tombstone
    assert state.waiting_verdicts() == 0


def test_the_same_verdict_twice_is_a_no_op_a_different_one_a_dead_letter(
    state: ResolveState,
) -> None:
    state.on_request(0, request("p1"), {}, 0)
    assert state.on_verdict(0, verdict("p1"), SRC, 1).kind == "resolved"
    again = state.on_verdict(0, verdict("p1"), SRC, 2)
    assert again.kind == "duplicate" and again.outputs == []
    other = state.on_verdict(0, verdict("p1", ["anger"]), SRC, 3)
    assert dead_letter(other).error.kind == "already_resolved"
    # the same request again (the post processed twice) does not reopen it
    assert state.on_request(0, request("p1"), {}, 4).kind == "duplicate"


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (b"{not json", "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (orjson.dumps({"post_id": "p1", "labels": ["joy"]}), "missing_field"),
        (verdict("p1", []), "invalid_field"),  # labelled without labels
        (verdict("p1", ["joy"], outcome="skip"), "invalid_field"),
        (verdict("p1", decided_at="yesterday"), "invalid_field"),
        (verdict("p1", ["happiness"]), "unknown_label"),
        (verdict("p1", request_id="posts:0:999"), "request_mismatch"),
        (None, "tombstone"),
    ],
)
def test_bad_verdicts_are_dead_letters_and_the_request_stays_pending(
    state: ResolveState, value: bytes | None, kind: str
) -> None:
    state.on_request(0, request("p1"), {}, 0)
    outcome = state.on_verdict(0, value, SRC, 1)
    assert outcome.kind == "dead_letter"
    letter = dead_letter(outcome)
    assert letter.error.kind == kind and letter.error.message
    assert finals(outcome) == []
    assert state.pending_requests() == 1
    # ... and a good verdict still resolves it
    assert state.on_verdict(0, verdict("p1"), SRC, 2).kind == "resolved"


def test_outcomes_other_than_labelled_have_no_labels_and_no_agreement(
    state: ResolveState,
) -> None:
    state.on_request(0, request("p1"), {}, 0)
    (final,) = finals(state.on_verdict(0, verdict("p1", [], outcome="not_english"), SRC, 1))
    assert final["labels"] == [] and final["outcome"] == "not_english"
    assert final["model_agreed"] is None
    ReviewVerdict.model_validate_json(verdict("p1", [], outcome="unreadable"))


def test_state_rebuilt_from_its_changelog_records_behaves_the_same(state: ResolveState) -> None:
    log: list[tuple[bytes, bytes | None]] = []
    for outcome in (
        state.on_request(0, request("p1"), {}, 0),
        state.on_request(0, request("p2", offset=6), {}, 0),
        state.on_verdict(0, verdict("p1"), SRC, 1),
        state.on_verdict(0, verdict("p3"), SRC, 2),
    ):
        log += [(o.key, o.value) for o in outcome.outputs if o.sink == "state"]
    rebuilt = ResolveState("resolver-2", verdict_wait_s=60)
    rebuilt.restore(0, log)
    assert (rebuilt.pending_requests(), rebuilt.waiting_verdicts()) == (1, 1)
    assert rebuilt.on_verdict(0, verdict("p1"), SRC, 3).kind == "duplicate"
    assert rebuilt.on_verdict(0, verdict("p2"), SRC, 3).kind == "resolved"
    assert rebuilt.on_request(0, request("p3", offset=7), {}, 3).kind == "resolved"
    rebuilt.drop(0)
    assert rebuilt.pending_requests() == 0


def test_unanswered_requests_and_old_resolved_markers_are_forgotten() -> None:
    state = ResolveState("r", verdict_wait_s=60, request_ttl_s=1000, keep_resolved_s=500)
    state.on_request(0, request("old"), {}, 0)
    state.on_request(0, request("done", offset=6), {}, 0)
    state.on_verdict(0, verdict("done"), SRC, 100)  # resolved at 100
    assert state.expire(599) == []
    ((_, forgotten),) = state.expire(600)
    assert forgotten.kind == "forgotten" and forgotten.outputs[0].key == b"done"
    assert forgotten.outputs[0].value is None  # a tombstone in the changelog
    ((_, unanswered),) = state.expire(1000)
    assert unanswered.kind == "unanswered" and state.pending_requests() == 0


def test_a_request_from_an_older_worker_gets_the_id_the_worker_gives_now(
    state: ResolveState,
) -> None:
    doc = orjson.loads(request("p1", offset=42))
    del doc["request_id"]  # written before schema 1.4
    state.on_request(0, orjson.dumps(doc), {}, 0)
    (final,) = finals(state.on_verdict(0, verdict("p1", request_id="posts:0:42"), SRC, 1))
    assert final["request_id"] == "posts:0:42"


def test_a_final_event_too_large_for_its_topic_is_a_dead_letter_not_a_stuck_resolver() -> None:
    from worker.kafka.topic_limits import TopicLimits

    limits = TopicLimits({"final": 2_000})
    state = ResolveState("r", verdict_wait_s=60, limits=limits, final_topic="final")
    state.on_request(0, request("p1"), {}, 0)
    outcome = state.on_verdict(0, verdict("p1", note="x" * 3_000), SRC, 1)
    assert finals(outcome) == []
    letter = dead_letter(outcome)
    assert letter.error.kind == "output_too_large" and "accepts 2000" in letter.error.message
    assert state.pending_requests() == 1  # a shorter verdict still resolves it
    assert state.on_verdict(0, verdict("p1"), SRC, 2).kind == "resolved"
