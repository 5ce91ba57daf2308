"""From MC statistics to output events: one enriched event per post, a review request for the
posts the policy routes.

Events are built as plain dicts in the shape of ``schemas.EnrichedPost`` (or
``CompactEnrichedPost``, ``event_layout=compact``) / ``ReviewRequest`` and serialised with
orjson: building pydantic objects for 28 labels per post would cost more than the transport
itself at high rates. For the same reason the ``emotions`` array (28 objects of 6 fields
per post) is written as JSON text for the whole batch at once (``EmotionsEncoder``) and embedded as
an ``orjson.Fragment``. Tests validate the events against the pydantic models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import orjson
from pydantic import TypeAdapter

from schemas import SCHEMA_VERSION, SocialPost
from worker.inference.uncertainty import McSummary
from worker.ood.scorer import OodBatch
from worker.routing.policy import ReviewDecision, ReviewPolicy, predicted_mask
from worker.routing.request_ids import now_rfc3339, request_id


@dataclass
class RoutedPost:
    """One post's events, ready for orjson: their ``emotions`` (or, in the compact layout, the
    enriched event's ``scores``) are JSON text already (an ``orjson.Fragment``);
    ``enriched_event()`` / ``review_event()`` give them as plain data."""

    post_id: str
    enriched: dict[str, Any]
    review: dict[str, Any] | None
    ood: str | None = None  # a flagged post's outcome: review, capped, tag or topic

    @property
    def unsupported(self) -> bool:
        """Out of distribution, for the unsupported topic (``ood.action=topic``)."""
        return self.ood == "topic"

    def enriched_bytes(self) -> bytes:
        return orjson.dumps(self.enriched)

    def review_bytes(self) -> bytes | None:
        return None if self.review is None else orjson.dumps(self.review)

    def enriched_event(self) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(self.enriched_bytes())
        return event

    def review_event(self) -> dict[str, Any] | None:
        review = self.review_bytes()
        return None if review is None else orjson.loads(review)


class EmotionsEncoder:
    """The ``emotions`` arrays of a batch as JSON text, one ``orjson.Fragment`` per post.

    Per post, 28 dicts of 6 fields cost ≈ 18 µs of interpreter time; here orjson formats the
    numbers of the whole batch in one call (the same text it writes for Python floats), and
    every post's text is the fixed JSON between them joined with its numbers. The JSON between
    a label's uncertainty and its flip rate holds its ``predicted`` flag: one of two fixed texts
    per label, chosen for the whole batch at once (formatting the flags as JSON cost as much as
    a field of numbers)."""

    def __init__(self, label_names: list[str], thresholds: np.ndarray) -> None:
        self.n_labels = len(label_names)
        # per label: the text before its probability and before its flip rate (predicted false
        # / true); the text before an uncertainty is the same for every label
        self._before_probability: list[str] = []
        before_flip: list[list[str]] = [[], []]
        for j, (name, threshold) in enumerate(
            zip(label_names, _rounded(thresholds, 4), strict=True)
        ):
            self._before_probability.append(
                ("[" if j == 0 else "},") + '{"label":' + orjson.dumps(name).decode()
                + ',"probability":'
            )  # fmt: skip
            for flag, text in ((False, "false"), (True, "true")):
                before_flip[flag].append(
                    ',"threshold":' + orjson.dumps(threshold).decode() + ',"predicted":' + text
                    + ',"flip_rate":'
                )  # fmt: skip
        self._before_flip = np.array(before_flip, dtype=object)  # (2, L): by predicted flag
        self._labels = np.arange(self.n_labels)

    def encode(
        self,
        mean: np.ndarray,
        std: np.ndarray,
        flip_rate: np.ndarray,
        predicted: np.ndarray,
        sampled: np.ndarray,
    ) -> list[orjson.Fragment]:
        """(B, L) statistics and predicted mask, (B,) sampled: B fragments. Probabilities and
        uncertainties rounded to 6 digits, flip rates to 4; uncertainty and flip rate are null
        for a post with one (deterministic) sample."""
        n_posts = len(mean)
        if n_posts == 0:
            return []
        numbers = np.stack(
            [
                np.round(np.asarray(mean, dtype=np.float64), 6),
                np.round(np.asarray(std, dtype=np.float64), 6),
                np.round(np.asarray(flip_rate, dtype=np.float64), 4),
            ],
            axis=2,
        )  # (B, L, 3): one orjson call formats them all
        dumped = orjson.dumps(numbers.ravel(), option=orjson.OPT_SERIALIZE_NUMPY)
        texts = dumped[1:-1].decode().split(",")
        # the batch's text pieces in one flat list, six per label (before the probability, the
        # probability, before the uncertainty, ...), filled by strided slices
        width = 6 * self.n_labels
        flat: list[str] = [""] * (n_posts * width)
        flat[0::6] = self._before_probability * n_posts
        flat[1::6] = texts[0::3]
        flat[2::6] = [',"uncertainty":'] * (n_posts * self.n_labels)
        flat[3::6] = texts[1::3]
        chosen = self._before_flip[np.asarray(predicted, dtype=np.intp), self._labels]
        flat[4::6] = chosen.ravel().tolist()
        flat[5::6] = texts[2::3]
        nulls = ["null"] * self.n_labels
        for i in np.flatnonzero(~np.asarray(sampled, dtype=bool)).tolist():
            flat[i * width + 3 : (i + 1) * width : 6] = nulls  # uncertainty
            flat[i * width + 5 : (i + 1) * width : 6] = nulls  # flip rate
        return [
            orjson.Fragment("".join(flat[i * width : (i + 1) * width]) + "}]")
            for i in range(n_posts)
        ]


class ScoreColumnsEncoder:
    """The compact layout's ``scores`` objects of a batch (``schemas.EmotionColumns``), one
    ``orjson.Fragment`` per post: the batch's numbers formatted by one orjson call, cut per post
    and per statistic, between the fixed texts. Rounded to 4 digits, a hundred times finer than
    the MC noise of a mean over 30 samples."""

    DIGITS = 4

    def __init__(self, label_names: list[str]) -> None:
        self._head = b'{"labels":' + orjson.dumps(label_names) + b',"probability":['

    def encode(
        self, mean: np.ndarray, std: np.ndarray, flip_rate: np.ndarray, sampled: np.ndarray
    ) -> list[orjson.Fragment]:
        """(B, L) statistics, (B,) sampled: B fragments; uncertainty and flip rate are null for
        a post with one (deterministic) sample."""
        if len(mean) == 0:
            return []
        numbers = np.round(
            np.stack([np.asarray(a, dtype=np.float64) for a in (mean, std, flip_rate)], axis=1),
            self.DIGITS,
        )  # (B, 3, L)
        text = orjson.dumps(numbers, option=orjson.OPT_SERIALIZE_NUMPY)  # [[[p..],[u..],[f..]],..]
        out = []
        for post, one_sample in zip(
            text[3:-3].split(b"]],[["), (~np.asarray(sampled, dtype=bool)).tolist(), strict=True
        ):
            probability, uncertainty, flip = post.split(b"],[")
            tail = (
                b'],"uncertainty":null,"flip_rate":null}'
                if one_sample
                else b'],"uncertainty":[' + uncertainty + b'],"flip_rate":[' + flip + b"]}"
            )
            out.append(orjson.Fragment(self._head + probability + tail))
        return out


_POSTS_AS_JSON = TypeAdapter(list[SocialPost])  # a batch's posts as JSON-ready dicts


def predicted_label_lists(mean: np.ndarray, thresholds: np.ndarray) -> list[list[int]]:
    """Per row of ``mean`` (B, L), the predicted labels (``policy.predicted_mask``: at or above
    their threshold, else the most probable one), most probable first; never empty."""
    mean = np.asarray(mean, dtype=np.float64)
    if mean.size == 0:
        return [[] for _ in range(len(mean))]
    return _most_probable_first(mean, predicted_mask(mean, np.asarray(thresholds, np.float64)))


def _most_probable_first(mean: np.ndarray, chosen: np.ndarray) -> list[list[int]]:
    """Per row, the ``chosen`` (B, L) labels ordered by ``mean``, most probable first (ties
    and NaN means in label order, NaN last), from one sort of the batch: the chosen labels sort
    before the others, so each row's are its first ``count``."""
    key = np.where(chosen, np.nan_to_num(-mean, nan=np.finfo(np.float64).max), np.inf)
    order = np.argsort(key, axis=1, kind="stable").tolist()
    counts = np.count_nonzero(chosen, axis=1).tolist()
    return [row[:count] for row, count in zip(order, counts, strict=True)]


def _rounded(values: Any, digits: int) -> list[Any]:
    """An array rounded as a whole, as Python numbers (per-element round() dominated routing)."""
    return list(np.round(np.asarray(values, dtype=np.float64), digits).tolist())


def _r(x: float, digits: int = 6) -> float:
    return round(float(x), digits)


OOD_SIGNALS = ("language", "density", "tokens_per_word", "unknown_share")


def ood_events(ood: OodBatch | None, decisions: list[ReviewDecision]) -> list[Any]:
    """Per post, the ``uncertainty.ood`` object (``schemas.OodSummary``), or None without OOD."""
    if ood is None:
        return [None] * len(decisions)
    missing = [None] * len(decisions)
    columns = {  # NaN (not measured for a post) as None
        name: [None if math.isnan(v) else v for v in _rounded(ood.signals[name], 4)]
        if name in ood.signals
        else missing
        for name in OOD_SIGNALS
    }
    scores = _rounded(ood.score, 4)
    flagged = ood.flagged.tolist()
    cut = _r(ood.cut, 4)
    out = []
    for i, decision in enumerate(decisions):
        verdict = ood.languages[i] if ood.languages is not None else None
        out.append(
            {
                "score": scores[i],
                "cut": cut,
                "flagged": flagged[i],
                "signal": ood.fired[i],
                "action": decision.ood,
                "language": verdict.language if verdict is not None else None,
                "language_source": verdict.source if verdict is not None else None,
                "signals": {name: column[i] for name, column in columns.items()},
            }
        )
    return out


class Router:
    def __init__(
        self,
        policy: ReviewPolicy,
        label_names: list[str],
        thresholds: np.ndarray,
        model_info: dict[str, Any],
        worker_id: str,
        layout: Literal["full", "compact"] = "full",
    ) -> None:
        self.policy = policy
        self.label_names = label_names
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.model_info = model_info
        self.worker_id = worker_id
        self.emotions = EmotionsEncoder(label_names, self.thresholds)
        # compact: the enriched event carries score columns; review requests keep the emotions
        self.scores = ScoreColumnsEncoder(label_names) if layout == "compact" else None

    def route(
        self,
        posts: list[SocialPost],
        sources: list[dict[str, Any] | None],
        summary: McSummary,
        ood: OodBatch | None = None,
        token_counts: list[int] | None = None,
    ) -> list[RoutedPost]:
        scores = self.policy.scores(summary, token_counts, ood)
        mean = np.asarray(summary.mean, dtype=np.float64)
        predicted = predicted_mask(mean, self.thresholds)
        predicted_lists = _most_probable_first(mean, predicted)
        decisions = self.policy.decide_all(summary, predicted_lists, scores, ood)
        columns = self._columns(summary, predicted, ood, decisions)
        post_dicts = _POSTS_AS_JSON.dump_python(posts, mode="json")  # one call: half the cost
        processed_at = now_rfc3339()
        return [
            self._events(
                i,
                post,
                post_dicts[i],
                sources[i],
                decisions[i],
                predicted_lists[i],
                columns,
                processed_at,
            )
            for i, post in enumerate(posts)
        ]

    def _columns(
        self,
        summary: McSummary,
        predicted: np.ndarray,
        ood: OodBatch | None,
        decisions: list[ReviewDecision],
    ) -> dict[str, list[Any]]:
        """The batch's per-post values as plain Python lists, computed with numpy once per batch:
        per-post numpy calls and per-element round() dominated the routing cost."""
        sampled = np.asarray(summary.n_samples) > 1
        if self.scores is None:  # full layout: every post's emotions, for both events
            emotions: list[Any] = self.emotions.encode(
                summary.mean, summary.std, summary.flip_rate, predicted, sampled
            )
            scores: list[Any] = [None] * len(sampled)
        else:  # compact: score columns for every post, emotions for the routed posts' requests
            scores = self.scores.encode(summary.mean, summary.std, summary.flip_rate, sampled)
            emotions = [None] * len(sampled)
            routed = [i for i, d in enumerate(decisions) if d.routed]
            for i, fragment in zip(
                routed,
                self.emotions.encode(
                    summary.mean[routed],
                    summary.std[routed],
                    summary.flip_rate[routed],
                    predicted[routed],
                    sampled[routed],
                ),
                strict=True,
            ):
                emotions[i] = fragment
        return {
            "max_flip_rate": _rounded(np.max(summary.flip_rate, axis=1), 4),
            "predictive_entropy": _rounded(summary.predictive_entropy, 6),
            "expected_entropy": _rounded(summary.expected_entropy, 6),
            "mutual_information": _rounded(summary.mutual_information, 6),
            "ood": ood_events(ood, decisions),
            "sampled": sampled.tolist(),
            "emotions": emotions,
            "scores": scores,
            "n_samples": np.asarray(summary.n_samples).astype(int).tolist(),
            "top_label": np.argmax(summary.mean, axis=1).tolist(),
        }

    def _events(
        self,
        i: int,
        post: SocialPost,
        post_dict: dict[str, Any],
        source: dict[str, Any] | None,
        decision: ReviewDecision,
        predicted: list[int],
        columns: dict[str, list[Any]],
        processed_at: str,
    ) -> RoutedPost:
        """Post ``i``'s enriched event and, when routed, its review request."""
        sampled = columns["sampled"][i]
        # a score that needs MC spread (threshold distance, mutual information) means nothing
        # for one deterministic pass: null then; expected risk and entropy are always defined
        scored = sampled or not self.policy.score_needs_samples
        uncertainty = {
            "predictive_entropy": columns["predictive_entropy"][i],
            "expected_entropy": columns["expected_entropy"][i] if sampled else None,
            "mutual_information": columns["mutual_information"][i] if sampled else None,
            "review_score": _r(decision.score) if scored else None,
            "max_flip_rate": columns["max_flip_rate"][i] if sampled else None,
            "n_samples": columns["n_samples"][i],
            "ood": columns["ood"][i],
        }
        reasons = [r.model_dump(mode="json") for r in decision.reasons]
        labels = [self.label_names[j] for j in predicted]
        emotions = columns["emotions"][i]
        enriched: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "id": post.id,
            "post": post_dict,
        }
        if self.scores is None:
            enriched["emotions"] = emotions
        else:
            enriched["layout"] = "compact"
            enriched["scores"] = columns["scores"][i]
        enriched |= {
            "predicted_labels": labels,
            "top_label": self.label_names[columns["top_label"][i]],
            "uncertainty": uncertainty,
            "needs_review": decision.routed,
            "review_reasons": reasons,
            "model": self.model_info,
            "processed_at": processed_at,
            "worker_id": self.worker_id,
            "source": source,
        }
        review = None
        if decision.routed:
            review = {
                "schema_version": SCHEMA_VERSION,
                "id": post.id,
                "priority": decision.priority,
                "review_score": _r(decision.score),
                "reasons": reasons,
                "post": post_dict,
                "predicted_labels": labels,
                "emotions": emotions,
                "uncertainty": uncertainty,
                "model": self.model_info,
                "requested_at": processed_at,
                "worker_id": self.worker_id,
                "source": source,
                "request_id": request_id(post.id, source, processed_at),
            }
        return RoutedPost(post_id=post.id, enriched=enriched, review=review, ood=decision.ood)
