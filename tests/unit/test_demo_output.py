"""The demo's printout of an example event: short in either event layout."""

from __future__ import annotations

from typing import Any

from worker.demo.__main__ import shortened

LABELS = [f"label-{i}" for i in range(28)]
PROBABILITY = [round(0.01 * i, 2) for i in range(28)]


def test_the_full_layout_keeps_its_three_most_probable_emotions() -> None:
    event: dict[str, Any] = {
        "id": "p1",
        "emotions": [
            {"label": n, "probability": p} for n, p in zip(LABELS, PROBABILITY, strict=True)
        ],
    }
    out = shortened(event)
    assert out is not None
    assert [e["label"] for e in out["emotions"][:3]] == ["label-27", "label-26", "label-25"]
    assert out["emotions"][3] == "... 25 more labels"
    assert len(event["emotions"]) == 28, "the event itself is left as it was"


def test_the_compact_layout_keeps_the_same_three_labels_in_every_array() -> None:
    event: dict[str, Any] = {
        "id": "p1",
        "layout": "compact",
        "scores": {
            "labels": LABELS,
            "probability": PROBABILITY,
            "uncertainty": [round(p / 10, 4) for p in PROBABILITY],
            "flip_rate": [0.0] * 28,
        },
    }
    out = shortened(event)
    assert out is not None
    scores = out["scores"]
    assert scores["labels"] == ["label-27", "label-26", "label-25", "... 25 more labels"]
    assert scores["probability"][:3] == [0.27, 0.26, 0.25]
    assert scores["uncertainty"][:3] == [0.027, 0.026, 0.025]
    assert scores["flip_rate"] == [0.0, 0.0, 0.0, "... 25 more labels"]
    assert len(event["scores"]["labels"]) == 28


def test_an_event_without_scores_is_printed_as_it_is() -> None:
    letter = {"id": "p1", "error": {"kind": "invalid_json"}}
    assert shortened(letter) == letter
    assert shortened(None) is None
