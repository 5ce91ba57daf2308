"""Wire formats of emotion-stream, as pydantic v2 models.

Every event carries ``schema_version``. Minor versions (``1.x``) only ever add optional fields (or
a layout a setting opts into: the compact enriched event, 1.5), so a reader of ``1`` can read any
``1.x`` the worker is configured to write; a new major version is a breaking change.
The JSON Schema files beside this module are generated from these models (``emoworker schema
--write``) and a test fails when they are stale.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

SCHEMA_VERSION = "1.5"
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
SUPPORTED_INPUT_MAJOR = "1"
MAX_ID_CHARS = 512


def visible_text(text: str) -> str:
    """The text without white space, control and format characters (zero-width, direction marks).

    A post whose text has nothing left is blank: there is nothing to classify.
    """
    return "".join(ch for ch in text if _visible(ch))


def _visible(ch: str) -> bool:
    return not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf")


def has_visible_text(text: str) -> bool:
    """Whether ``visible_text(text)`` is not empty; stops at the first visible character (the
    check runs on every consumed post)."""
    return any(_visible(ch) for ch in text)


def check_schema_version(value: str) -> str:
    if value.split(".", 1)[0] != SUPPORTED_INPUT_MAJOR:
        raise PydanticCustomError(
            "unsupported_schema_version",
            "schema_version '{version}' is not supported: this worker reads version {major}.x",
            {"version": value, "major": SUPPORTED_INPUT_MAJOR},
        )
    return value


class SocialPost(BaseModel):
    """A social post to classify (the input topic). Unknown fields are kept and passed through."""

    model_config = ConfigDict(extra="allow", title="SocialPost")

    schema_version: StrictStr = Field(
        SCHEMA_VERSION, description="Input format version; any 1.x is accepted."
    )
    id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)] = Field(
        description="Unique id of the post; the key of its enriched event."
    )
    text: StrictStr = Field(description="The post's text; must hold visible characters.")
    author: Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)] | None = Field(
        None, description="Author handle or id (at most 512 characters)."
    )
    platform: Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)] | None = Field(
        None, description="Where the post comes from, e.g. reddit (at most 512 characters)."
    )
    created_at: AwareDatetime | None = Field(
        None, description="When the post was written (RFC 3339, with a time zone)."
    )
    lang: Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)] | None = Field(
        None, description="Language tag, e.g. en (at most 512 characters)."
    )
    metadata: dict[str, Any] | None = Field(None, description="Free-form object, passed through.")

    _check_version = field_validator("schema_version")(check_schema_version)

    @field_validator("created_at", mode="before")
    @classmethod
    def _rfc3339(cls, value: object) -> object:
        if value is None:
            return value
        if not isinstance(value, str) or not RFC3339.match(value):
            raise PydanticCustomError(
                "rfc3339", "created_at must be an RFC 3339 date-time with a time zone"
            )
        return value

    @field_validator("id")
    @classmethod
    def _id_not_blank(cls, value: str) -> str:
        if not has_visible_text(value):
            raise PydanticCustomError("blank_id", "id must hold visible characters")
        return value

    @field_validator("text")
    @classmethod
    def _text_not_blank(cls, value: str) -> str:
        if not has_visible_text(value):
            raise PydanticCustomError(
                "blank_text", "text is empty or holds only white space or invisible characters"
            )
        return value


class EmotionScore(BaseModel):
    label: str = Field(description="Emotion name (the model's label).")
    probability: float = Field(description="Mean of the sigmoid outputs over the MC samples.")
    uncertainty: float | None = Field(
        description="Standard deviation of the sigmoid outputs over the MC samples (null when "
        "the model runs deterministically)."
    )
    threshold: float = Field(description="Decision threshold of this label.")
    predicted: bool = Field(description="probability >= threshold (or the fallback top label).")
    flip_rate: float | None = Field(
        None,
        description="Share of MC samples on the other side of the threshold from the mean.",
    )


class UncertaintySummary(BaseModel):
    """Per-post uncertainty from the MC samples (nats; formulas in the README)."""

    predictive_entropy: float | None = Field(
        description="Total uncertainty: summed binary entropy of the mean probabilities."
    )
    expected_entropy: float | None = Field(
        description="Aleatoric part: mean over samples of the summed binary entropy."
    )
    mutual_information: float | None = Field(
        description="Epistemic part (BALD): predictive_entropy - expected_entropy."
    )
    review_score: float | None = Field(
        description="The score the review policy ranks posts by (higher: more uncertain)."
    )
    max_flip_rate: float | None = Field(
        None, description="Largest per-label share of samples across the threshold."
    )
    n_samples: int = Field(description="MC samples actually drawn for this post.")
    ood: OodSummary | None = Field(
        None, description="Out-of-distribution signals (null when ood.enabled is false)."
    )


class ReviewReason(BaseModel):
    rule: str = Field(description="The policy rule that fired, e.g. ambiguous_label.")
    message: str = Field(description="Human-readable explanation.")
    label: str | None = Field(None, description="The label concerned, if any.")
    value: float | None = Field(None, description="The measured value that triggered the rule.")
    cut: float | None = Field(None, description="The configured cut it was compared with.")
    signal: str | None = Field(
        None,
        description="out_of_distribution: the signal that raised the flag (language, density, "
        "tokens_per_word, unknown_share) (since 1.3).",
    )


class OodSignals(BaseModel):
    """Each out-of-distribution signal's raw value (null when not measured for this model)."""

    language: float | None = Field(
        None, description="-log10 P(supported languages) by language identification; 0 to 30."
    )
    density: float | None = Field(
        None,
        description="Squared Mahalanobis distance of the post's middle-layer representation to "
        "the nearest class of the training posts.",
    )
    tokens_per_word: float | None = Field(
        None, description="Word pieces per white-space separated word."
    )
    unknown_share: float | None = Field(
        None, description="Share of word pieces that are the tokenizer's unknown token."
    )


class OodSummary(BaseModel):
    """Whether the post is unlike anything the model was trained on (since 1.3)."""

    score: float = Field(
        description="Combined OOD score, higher = more out of distribution: the largest signal "
        "on the in-distribution scale (1 = the 99th percentile of in-distribution posts)."
    )
    cut: float = Field(description="Posts above this score are flagged.")
    flagged: bool = Field(
        description="The emotions of a flagged post are unreliable: dashboards may leave it out."
    )
    signal: str | None = Field(None, description="The signal that raised the flag.")
    action: Literal["review", "capped", "tag", "topic"] | None = Field(
        None,
        description="What happened to a flagged post: sent to review, over the review cap "
        "(tagged only), tagged, or sent to the unsupported topic.",
    )
    language: str | None = Field(
        None, description="The most probable language (or the producer's lang)."
    )
    language_source: Literal["detected", "producer"] | None = None
    signals: OodSignals


class ModelInfo(BaseModel):
    name: str = Field(description="Model name or path.")
    revision: str | None = Field(None, description="Revision or content hash of the weights.")
    n_samples: int = Field(description="Configured MC samples (the most a post receives).")
    mc_mode: str = Field(description="full, fast or off.")
    precision: str | None = Field(
        None, description="Matmul precision of the MC passes: fp32, bf16 or fp16 (since 1.1)."
    )
    rollout_version: int | None = Field(
        None,
        description="The rollout (control topic) this model came from; null: the configured "
        "model (since 1.4).",
    )


class KafkaSource(BaseModel):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = Field(None, description="The record's Kafka timestamp.")


class FileSource(BaseModel):
    path: str
    line: int = Field(description="1-based line number in the input file.")


class EmotionColumns(BaseModel):
    """The compact layout's per-label scores: one array per statistic, in ``labels`` order
    (since 1.5)."""

    labels: list[str] = Field(description="The model's labels; the order of the other arrays.")
    probability: list[float] = Field(
        description="Mean of the sigmoid outputs over the MC samples, rounded to 4 digits."
    )
    uncertainty: list[float] | None = Field(
        description="Standard deviation over the MC samples, rounded to 4 digits (null when "
        "the model runs deterministically)."
    )
    flip_rate: list[float] | None = Field(
        description="Share of MC samples on the other side of the threshold from the mean "
        "(null when the model runs deterministically)."
    )


class _EnrichedFields(BaseModel):
    """What both layouts of the enriched event hold besides the per-label scores."""

    schema_version: str = SCHEMA_VERSION
    id: str = Field(description="The post's id.")
    post: SocialPost = Field(description="The input post as received, unknown fields included.")
    predicted_labels: list[str] = Field(
        description="Labels at or above their threshold; never empty (falls back to the most "
        "probable label)."
    )
    top_label: str = Field(description="The most probable label.")
    uncertainty: UncertaintySummary
    needs_review: bool = Field(description="True when a review request was published.")
    review_reasons: list[ReviewReason] = Field(default_factory=list)
    model: ModelInfo
    processed_at: datetime
    worker_id: str
    source: KafkaSource | FileSource | None = None


class EnrichedPost(_EnrichedFields):
    """One per valid input post (the enriched topic, key = post id): the default layout, one
    object per label."""

    model_config = ConfigDict(title="EnrichedPost")

    emotions: list[EmotionScore] = Field(description="One entry per label of the model.")


class CompactEnrichedPost(_EnrichedFields):
    """The enriched event in the compact layout (``EMOWORKER_EVENT_LAYOUT=compact``, since 1.5):
    the per-label scores as arrays, without the thresholds and predicted flags (the model's
    thresholds are in its bundle; ``predicted_labels`` names the labels that passed)."""

    model_config = ConfigDict(title="CompactEnrichedPost")

    layout: Literal["compact"] = Field(description="Marks the compact layout.")
    scores: EmotionColumns


class ReviewRequest(BaseModel):
    """A post sent to human review (the review topic, key = post id)."""

    model_config = ConfigDict(title="ReviewRequest")

    schema_version: str = SCHEMA_VERSION
    id: str
    priority: int = Field(
        ge=0,
        le=100,
        description="0-100, higher first: the percentile of this post's review score among "
        "recent posts.",
    )
    review_score: float
    reasons: list[ReviewReason] = Field(min_length=1)
    post: SocialPost
    predicted_labels: list[str]
    emotions: list[EmotionScore]
    uncertainty: UncertaintySummary
    model: ModelInfo
    requested_at: datetime
    worker_id: str
    source: KafkaSource | FileSource | None = None
    request_id: str | None = Field(
        None,
        description="Identifies this request: the input record's topic:partition:offset (the "
        "same when a post is processed again after a failure), else path:line or "
        "id@requested_at. A verdict names it (since 1.4).",
    )


DeadLetterKind = Literal[
    "tombstone",
    "empty_message",
    "message_too_large",
    "invalid_utf8",
    "invalid_json",
    "not_an_object",
    "missing_field",
    "invalid_field",
    "blank_text",
    "text_too_long",
    "nesting_too_deep",
    "unsupported_schema_version",
    "processing_error",
    "output_too_large",
    "output_unserialisable",
    "unknown_post",
    "unknown_label",
    "request_mismatch",
    "already_resolved",
]


class DeadLetterError(BaseModel):
    kind: DeadLetterKind
    message: str = Field(description="What is wrong, in words.")
    field: str | None = Field(None, description="The offending field, if any.")


class DeadLetterPayload(BaseModel):
    encoding: Literal["utf-8", "base64"] = Field(
        description="utf-8: data is the message text; base64: the raw bytes."
    )
    data: str | None = Field(description="The original message (null for a tombstone).")
    size_bytes: int = Field(description="Size of the original message.")
    truncated: bool = Field(description="True when only the first bytes are kept.")
    sha256: str | None = Field(description="SHA-256 of the whole original message.")


class RecordHeader(BaseModel):
    key: str = Field(description="Header name, as the producer set it.")
    value_base64: str | None = Field(description="Header value, base64 (null: no value).")


class DeadLetter(BaseModel):
    """A message that could not be processed (the dead-letter topic)."""

    model_config = ConfigDict(title="DeadLetter")

    schema_version: str = SCHEMA_VERSION
    error: DeadLetterError
    source: KafkaSource | FileSource
    key_base64: str | None = Field(None, description="The record key, base64.")
    payload: DeadLetterPayload
    failed_at: datetime
    worker_id: str
    headers: list[RecordHeader] | None = Field(
        None,
        description="The record's headers, in order, values base64; restored by replay "
        "(since 1.2).",
    )


VerdictOutcome = Literal["labelled", "unreadable", "not_english", "skip"]


class ReviewVerdict(BaseModel):
    """A reviewer's decision on a review request (the verdicts topic, key = post id; since 1.4).

    Produce it keyed by the post id with Kafka's default partitioner (murmur2; librdkafka
    clients: ``partitioner=murmur2_random``) so that it meets its request in the same partition.
    """

    model_config = ConfigDict(title="ReviewVerdict")

    schema_version: StrictStr = SCHEMA_VERSION
    post_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)] = Field(
        description="The reviewed post's id."
    )
    request_id: Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)] | None = Field(
        None,
        description="The review request answered (its request_id); null: the post's pending one.",
    )
    reviewer_id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)] = Field(
        description="Who decided."
    )
    outcome: VerdictOutcome = Field(
        "labelled",
        description="labelled (labels hold the reviewer's emotions), unreadable, not_english or "
        "skip (labels empty: the post keeps no emotion labels from the review).",
    )
    labels: list[StrictStr] = Field(
        default_factory=list, max_length=64, description="The emotions the reviewer chose."
    )
    note: Annotated[StrictStr, Field(max_length=4000)] | None = None
    decided_at: AwareDatetime = Field(description="When the reviewer decided (RFC 3339).")
    seconds_spent: Annotated[float, Field(ge=0)] | None = Field(
        None, description="Time the reviewer spent on the post."
    )

    _check_version = field_validator("schema_version")(check_schema_version)

    @field_validator("labels")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _labels_match_outcome(self) -> ReviewVerdict:
        if self.outcome == "labelled" and not self.labels:
            raise PydanticCustomError("no_labels", "a labelled verdict needs at least one label")
        if self.outcome != "labelled" and self.labels:
            raise PydanticCustomError(
                "labels_with_outcome",
                "a verdict with outcome {outcome} has no labels",
                {"outcome": self.outcome},
            )
        return self


class FinalPost(BaseModel):
    """A reviewed post with the reviewer's final word (the final topic, key = post id; since
    1.4): the enriched event's content, the reviewer's labels, who decided and when, and whether
    the model agreed."""

    model_config = ConfigDict(title="FinalPost")

    schema_version: str = SCHEMA_VERSION
    id: str
    post: SocialPost
    labels: list[str] = Field(description="The final labels: the reviewer's.")
    outcome: VerdictOutcome
    decided_by: str = Field(description="The reviewer's id.")
    decided_at: datetime
    seconds_spent: float | None = None
    note: str | None = None
    model_labels: list[str] = Field(description="What the model predicted.")
    model_agreed: bool | None = Field(
        description="The reviewer chose exactly the model's labels (null unless labelled)."
    )
    emotions: list[EmotionScore]
    uncertainty: UncertaintySummary
    review_reasons: list[ReviewReason]
    review_score: float
    model: ModelInfo
    request_id: str
    requested_at: datetime
    resolved_at: datetime
    resolver_id: str
    source: KafkaSource | FileSource | None = Field(None, description="The post's input record.")


class BundleRelease(BaseModel):
    """One model release: a bundle and, optionally, thresholds recalibrated from verdicts."""

    version: int = Field(
        ge=0,
        description="Increases with every promotion or rollback; 0: the model the workers were "
        "configured with before the first release.",
    )
    model_path: str = Field(description="The bundle's folder, as every worker sees it.")
    revision: str | None = Field(None, description="Content hash of the bundle's weights.")
    thresholds: dict[str, float] | None = Field(
        None, description="Per-label thresholds replacing the bundle's (null: the bundle's)."
    )
    reason: Literal["configured", "promote", "thresholds", "rollback"]
    note: str | None = None
    announced_at: datetime
    announced_by: str


class ModelRollout(BaseModel):
    """The model the workers should run (the control topic, key ``rollout``; since 1.4)."""

    model_config = ConfigDict(title="ModelRollout")

    schema_version: str = SCHEMA_VERSION
    current: BundleRelease
    previous: list[BundleRelease] = Field(
        default_factory=list, description="Earlier releases, most recent first (at most 10)."
    )


EVENT_MODELS: dict[str, type[BaseModel]] = {
    "social_post": SocialPost,
    "enriched_post": EnrichedPost,
    "enriched_post_compact": CompactEnrichedPost,
    "review_request": ReviewRequest,
    "dead_letter": DeadLetter,
    "review_verdict": ReviewVerdict,
    "final_post": FinalPost,
    "model_rollout": ModelRollout,
}
