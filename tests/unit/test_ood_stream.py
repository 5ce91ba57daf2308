"""A mixed English / other-language stream through file mode: each OOD action routes exactly as
configured (counts per action, the per-minute cap), and the budget routes the English posts alone.

The test model carries no OOD calibration, so the worker uses the built-in one (language
identification with its GoEmotions dev reference); the bundle's own is tested in test_ood.py."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from support.texts import ENGLISH_POSTS, FOREIGN_POSTS

from schemas import EnrichedPost, ReviewRequest
from worker.decoding import DecodeLimits
from worker.file_mode import FileRunStats, classify_stream
from worker.inference.loading import Classifier
from worker.processing import BatchProcessor
from worker.settings import WorkerSettings

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPEAT = 3  # 36 English and 36 foreign posts, interleaved


def stream() -> tuple[bytes, set[str]]:
    lines, foreign = [], set()
    for r in range(REPEAT):
        for i, (english, (lang, other)) in enumerate(
            zip(ENGLISH_POSTS, FOREIGN_POSTS, strict=True)
        ):
            lines.append(orjson.dumps({"id": f"en-{r}-{i}", "text": english}))
            lines.append(orjson.dumps({"id": f"{lang}-{r}-{i}", "text": other}))
            foreign.add(f"{lang}-{r}-{i}")
    return b"\n".join(lines) + b"\n", foreign


@dataclass
class Run:
    stats: FileRunStats
    events: dict[str, Any]
    reviews: dict[str, Any]
    unsupported: list[str]
    foreign: set[str]


def classify(classifier: Classifier, ood: dict[str, Any], target_rate: float | None) -> Run:
    settings = WorkerSettings.from_layers(
        {
            "model": {"n_samples": 3, "seed": 7, "device": "cpu"},
            # without a budget only the rules route: the ambiguity band is off, so none fires
            "review": {"target_rate": target_rate, "warmup_posts": 0, "band_sigmas": 0},
            "ood": ood,
        },
        {},
    )
    processor = BatchProcessor(classifier, settings)
    data, foreign = stream()
    out: dict[str, list[bytes]] = {"enriched": [], "review": [], "unsupported": [], "dlq": []}
    stats = classify_stream(
        io.BytesIO(data),
        "mixed.jsonl",
        processor,
        DecodeLimits.of(settings),
        out["enriched"].append,
        out["dlq"].append,
        out["review"].append,
        out["unsupported"].append,
        batch_size=16,
    )
    events = {e["id"]: e for e in map(orjson.loads, out["enriched"])}
    reviews = {r["id"]: r for r in map(orjson.loads, out["review"])}
    unsupported = [orjson.loads(u)["id"] for u in out["unsupported"]]
    assert not out["dlq"] and len(events) == 2 * len(foreign)
    for event in events.values():
        EnrichedPost.model_validate(event)
        ood_event = event["uncertainty"]["ood"]
        assert ood_event["flagged"] is (event["id"] in foreign), event["post"]["text"]
    for review in reviews.values():
        ReviewRequest.model_validate(review)
    return Run(stats, events, reviews, unsupported, foreign)


def test_review_action_sends_every_foreign_post_to_review_with_its_reason(
    test_classifier: Classifier,
) -> None:
    run = classify(test_classifier, {"action": "review", "max_per_minute": None}, target_rate=None)
    # no budget, no other rule on: review holds exactly the foreign posts
    assert set(run.reviews) == run.foreign and not run.unsupported
    assert run.stats.ood == {"review": len(run.foreign)}
    for post_id in run.foreign:
        (reason,) = [
            r for r in run.reviews[post_id]["reasons"] if r["rule"] == "out_of_distribution"
        ]
        lang = post_id.split("-")[0]
        assert (
            reason["signal"] == "language" and f"unsupported language: {lang}" in reason["message"]
        )
        assert run.events[post_id]["uncertainty"]["ood"]["language"] == lang


def test_the_cap_holds_back_the_flood_and_the_budget_routes_english_posts_alone(
    test_classifier: Classifier,
) -> None:
    run = classify(test_classifier, {"action": "review", "max_per_minute": 10}, target_rate=0.25)
    routed_foreign = run.foreign & set(run.reviews)
    assert len(routed_foreign) == 10 and run.stats.ood == {"review": 10, "capped": 26}
    capped = [i for i in run.foreign - routed_foreign]
    assert all(run.events[i]["uncertainty"]["ood"]["action"] == "capped" for i in capped)
    assert all(not run.events[i]["needs_review"] for i in capped)
    # the budget saw the 36 English posts only and routed about a quarter of them
    english_routed = set(run.reviews) - run.foreign
    assert 4 <= len(english_routed) <= 14
    assert all(
        r["rule"] != "out_of_distribution"
        for i in english_routed
        for r in run.reviews[i]["reasons"]
    )


def test_topic_action_sends_foreign_posts_to_the_unsupported_topic_not_to_review(
    test_classifier: Classifier,
) -> None:
    run = classify(test_classifier, {"action": "topic"}, target_rate=None)
    assert sorted(run.unsupported) == sorted(run.foreign) and run.stats.unsupported == len(
        run.foreign
    )
    assert not set(run.reviews) & run.foreign and run.stats.ood == {"topic": len(run.foreign)}


def test_tag_action_only_marks_the_events(test_classifier: Classifier) -> None:
    run = classify(test_classifier, {"action": "tag"}, target_rate=None)
    assert not run.reviews and not run.unsupported and run.stats.ood == {"tag": len(run.foreign)}


def test_ood_off_publishes_no_ood_object(test_classifier: Classifier) -> None:
    settings = WorkerSettings.from_layers(
        {"model": {"n_samples": 2, "seed": 1}, "ood": {"enabled": False}}, {}
    )
    processor = BatchProcessor(test_classifier, settings)
    assert processor.ood is None and processor.engine.features is None
    (routed,) = processor.process(
        [
            *map(
                lambda t: __import__("schemas").SocialPost(id="x", text=t),
                ["hallo welt, wie geht es euch allen heute"],
            )
        ],
        [None],
    )
    assert routed.enriched["uncertainty"]["ood"] is None
