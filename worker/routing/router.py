"""From MC statistics to output events: one enriched event per post, a review request for the
posts the policy routes.

Events are built as plain dicts in the shape of ``schemas.EnrichedPost`` / ``ReviewRequest`` and
serialised with orjson: building pydantic objects for 28 labels per post would cost more than the
transport itself at high rates. Tests validate the dicts against the pydantic models.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson

from schemas import SCHEMA_VERSION, SocialPost
from worker.inference.uncertainty import McSummary
from worker.routing.policy import ReviewPolicy, predicted_mask


@dataclass
class RoutedPost:
    post_id: str
    enriched: dict[str, Any]
    review: dict[str, Any] | None

    def enriched_bytes(self) -> bytes:
        return orjson.dumps(self.enriched)

    def review_bytes(self) -> bytes | None:
        return None if self.review is None else orjson.dumps(self.review)


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def predicted_label_indices(mean: np.ndarray, thresholds: np.ndarray) -> list[int]:
    """One post's predicted labels (see ``predicted_label_lists``)."""
    return predicted_label_lists(np.asarray(mean)[None, :], thresholds)[0]


def predicted_label_lists(mean: np.ndarray, thresholds: np.ndarray) -> list[list[int]]:
    """Per row of ``mean`` (B, L), the predicted labels (``policy.predicted_mask``: at or above
    their threshold, else the most probable one), most probable first; never empty."""
    mean = np.asarray(mean, dtype=np.float64)
    if mean.size == 0:
        return [[] for _ in range(len(mean))]
    chosen = predicted_mask(mean, np.asarray(thresholds, dtype=np.float64)).tolist()
    order = np.argsort(-mean, axis=1, kind="stable").tolist()
    return [[j for j in row_order if row[j]] for row_order, row in zip(order, chosen, strict=True)]


def _rounded(values: Any, digits: int) -> list[Any]:
    """An array rounded as a whole, as Python numbers (per-element round() dominated routing)."""
    return list(np.round(np.asarray(values, dtype=np.float64), digits).tolist())


def _r(x: float, digits: int = 6) -> float:
    return round(float(x), digits)


class Router:
    def __init__(
        self,
        policy: ReviewPolicy,
        label_names: list[str],
        thresholds: np.ndarray,
        model_info: dict[str, Any],
        worker_id: str,
    ) -> None:
        self.policy = policy
        self.label_names = label_names
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.model_info = model_info
        self.worker_id = worker_id

    def route(
        self,
        posts: list[SocialPost],
        sources: list[dict[str, Any] | None],
        summary: McSummary,
    ) -> list[RoutedPost]:
        scores = self.policy.scores(summary)
        processed_at = now_rfc3339()
        # per-batch numpy work, then plain Python per post: per-post numpy calls and per-element
        # round() dominated the routing cost
        means, stds = _rounded(summary.mean, 6), _rounded(summary.std, 6)
        flip_rates, max_flip_rates = (
            _rounded(summary.flip_rate, 4),
            _rounded(np.max(summary.flip_rate, axis=1), 4),
        )
        thresholds = _rounded(self.thresholds, 4)
        predictive_entropy = _rounded(summary.predictive_entropy, 6)
        expected_entropy = _rounded(summary.expected_entropy, 6)
        mutual_information = _rounded(summary.mutual_information, 6)
        predicted_lists = predicted_label_lists(summary.mean, self.thresholds)
        decisions = self.policy.decide_all(summary, predicted_lists, scores)
        sampled_posts = (np.asarray(summary.n_samples) > 1).tolist()
        n_samples = np.asarray(summary.n_samples).astype(int).tolist()
        top_labels = np.argmax(summary.mean, axis=1).tolist()
        names = self.label_names
        out: list[RoutedPost] = []
        for i, post in enumerate(posts):
            sampled = sampled_posts[i]
            predicted = predicted_lists[i]
            chosen = set(predicted)
            emotions = [
                {
                    "label": name,
                    "probability": m,
                    "uncertainty": s if sampled else None,
                    "threshold": t,
                    "predicted": j in chosen,
                    "flip_rate": f if sampled else None,
                }
                for j, (name, m, s, t, f) in enumerate(
                    zip(names, means[i], stds[i], thresholds, flip_rates[i], strict=True)
                )
            ]
            decision = decisions[i]
            # a score that needs MC spread (threshold distance, mutual information) means nothing
            # for one deterministic pass: null then; expected risk and entropy are always defined
            scored = sampled or not self.policy.score_needs_samples
            uncertainty = {
                "predictive_entropy": predictive_entropy[i],
                "expected_entropy": expected_entropy[i] if sampled else None,
                "mutual_information": mutual_information[i] if sampled else None,
                "review_score": _r(decision.score) if scored else None,
                "max_flip_rate": max_flip_rates[i] if sampled else None,
                "n_samples": n_samples[i],
            }
            reasons = [r.model_dump(mode="json") for r in decision.reasons]
            post_dict = post.model_dump(mode="json")
            labels = [names[j] for j in predicted]
            enriched = {
                "schema_version": SCHEMA_VERSION,
                "id": post.id,
                "post": post_dict,
                "emotions": emotions,
                "predicted_labels": labels,
                "top_label": names[top_labels[i]],
                "uncertainty": uncertainty,
                "needs_review": decision.routed,
                "review_reasons": reasons,
                "model": self.model_info,
                "processed_at": processed_at,
                "worker_id": self.worker_id,
                "source": sources[i],
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
                    "source": sources[i],
                }
            out.append(RoutedPost(post_id=post.id, enriched=enriched, review=review))
        return out
