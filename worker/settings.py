"""All configuration in one place: environment variables prefixed ``EMOWORKER_``, and ``.env``.

Nested groups use a double underscore, e.g. ``EMOWORKER_REVIEW__TARGET_RATE=0.05``.
The README's configuration reference is generated from this class (``emoworker config-docs``).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Precision = Literal["auto", "fp32", "bf16", "fp16"]  # of the MC passes: see inference/precision.py
McMode = Literal["full", "fast", "off"]  # how the MC samples are drawn: see inference/engine.py
# what ranks posts for review: see routing/policy.py (auto: learned when the model has one)
ReviewScore = Literal[
    "auto",
    "learned",
    "threshold_distance",
    "expected_risk",
    "mutual_information",
    "predictive_entropy",
]

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class KafkaSettings(BaseModel):
    """Connection, security and client tuning."""

    bootstrap_servers: str = Field(
        "localhost:9092", description="Comma-separated host:port list of the Kafka cluster."
    )
    client_id: str = Field("emotion-stream", description="Client id reported to the brokers.")
    security_protocol: SecurityProtocol = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    sasl_mechanism: SaslMechanism | None = Field(
        None, description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a SASL protocol)."
    )
    sasl_username: str | None = Field(None, description="SASL user name.")
    sasl_password: SecretStr | None = Field(
        None, description="SASL password (never logged; shown as '**********')."
    )
    ssl_cafile: Path | None = Field(None, description="CA bundle that signs the brokers' certs.")
    ssl_certfile: Path | None = Field(None, description="Client certificate (mutual TLS).")
    ssl_keyfile: Path | None = Field(None, description="Client private key (mutual TLS).")
    ssl_key_password: SecretStr | None = Field(None, description="Password of the client key.")
    ssl_check_hostname: bool = Field(True, description="Verify the broker's host name (TLS).")
    session_timeout_ms: int = Field(
        45_000, description="Consumer group session timeout; heartbeats run in the background."
    )
    heartbeat_interval_ms: int = Field(3_000, description="Consumer heartbeat interval.")
    max_poll_interval_ms: int = Field(
        300_000,
        description="Longest gap between polls before the group evicts this worker. The worker "
        "keeps polling while inference runs, so only a stuck process reaches it.",
    )
    fetch_max_bytes: int = Field(16 * 1024 * 1024, description="Largest fetch response.")
    max_partition_fetch_bytes: int = Field(
        2 * 1024 * 1024, description="Largest fetch per partition (must exceed the message limit)."
    )
    request_timeout_ms: int = Field(30_000, description="Broker request timeout.")
    retry_backoff_ms: int = Field(200, description="Backoff between client retries.")
    producer_linger_ms: int = Field(5, description="Producer batching delay.")
    producer_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = Field(
        "none", description="Compression of the output topics."
    )
    producer_max_request_bytes: int = Field(
        4 * 1024 * 1024, description="Largest produce request (an enriched event is ~4 KB)."
    )
    delivery_timeout_s: float = Field(
        120.0,
        description="How long one output may keep retrying before the worker gives up, stops "
        "consuming and exits non-zero without committing past it.",
    )
    startup_timeout_s: float = Field(
        0.0,
        description="How long to keep retrying an unreachable cluster at start-up, with "
        "exponential backoff; 0 retries forever (the worker reports not-ready meanwhile).",
    )


class TopicSettings(BaseModel):
    input: str = Field("posts", description="Topic the social posts are read from.")
    enriched: str = Field("posts.enriched", description="Every valid post, classified.")
    review: str = Field("posts.review", description="Posts routed to human review.")
    dead_letter: str = Field("posts.dead-letter", description="Messages that could not be read.")
    unsupported: str = Field(
        "posts.unsupported",
        description="Posts the model cannot read (out of distribution), when ood.action is topic.",
    )
    verdicts: str = Field(
        "posts.verdicts",
        description="Reviewers' verdicts on review requests (key = post id; as many partitions "
        "as the review topic).",
    )
    final: str = Field(
        "posts.final", description="Reviewed posts with the reviewer's final word (resolver)."
    )
    control: str = Field(
        "posts.control",
        description="Model rollouts (one partition, compacted): workers follow it and swap "
        "models between batches (emoworker rollout).",
    )
    verdicts_dead_letter: str = Field(
        "posts.verdicts.dead-letter",
        description="Verdicts the resolver cannot apply (malformed, unknown post, unknown label, "
        "already resolved otherwise).",
    )


class HeaderSettings(BaseModel):
    """Which input record headers the outputs carry (names match case-insensitively; shell-style
    patterns). Every output also gets ``content-type`` and ``schema-version``; dead letters keep
    all input headers in their JSON, for replay."""

    propagate: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["*"],
        description="Input headers copied to the enriched event, review request and dead letter "
        "records, comma-separated patterns; empty: none.",
    )
    drop: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Input headers never copied, comma-separated patterns (wins over "
        "propagate), e.g. authorization,x-internal-*.",
    )

    @field_validator("propagate", "drop", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return comma_separated(value)


def comma_separated(value: object) -> object:
    """A comma-separated (or JSON array) environment value as a list (an empty variable: an
    empty list); other values unchanged."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class ReviewSettings(BaseModel):
    """When a post goes to human review. See the README's review section."""

    policy_file: Path | None = Field(
        None, description="TOML or YAML review policy; overrides the fields below when set."
    )
    score: ReviewScore = Field(
        "auto",
        description="What ranks posts for review (published as uncertainty.review_score): auto "
        "is learned (the model's risk selector) when its bundle has one, else expected_risk "
        "(docs/review-routing.md).",
    )
    target_rate: float | None = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Share of posts to route to review (review budget); empty disables the "
        "budget so that every post a rule flags is routed.",
    )
    max_per_minute: float | None = Field(
        None, gt=0, description="Hard cap on review requests per minute per worker."
    )
    epistemic_cut: float | None = Field(
        None,
        ge=0,
        description="Flag when mutual information exceeds this (nats): routes when the "
        "budget is off; with a budget the score decides and this is given as a reason.",
    )
    band_sigmas: float = Field(
        1.0,
        ge=0,
        description="A label is ambiguous when |mean - threshold| < band_sigmas x its MC std.",
    )
    watch_labels: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Labels with a stricter rule (always routed), comma-separated, e.g. "
        "grief,remorse,nervousness,fear.",
    )
    watch_min_probability: float | None = Field(
        0.2,
        ge=0,
        le=1,
        description="A watch-listed label whose mean reaches this is routed; empty disables "
        "this clause.",
    )
    watch_band_sigmas: float | None = Field(
        None,
        ge=0,
        description="A watch-listed label is also routed when its mean lies within this many "
        "MC std of its threshold; empty: 2 x band_sigmas.",
    )
    watch_in_budget: bool = Field(
        True,
        description="Watch-listed posts count toward target_rate: the score routes fewer other "
        "posts so the total share stays at the target.",
    )
    neutral_label: str = Field("neutral", description="The label that means 'no emotion'.")
    low_confidence_neutral: float | None = Field(
        None,
        description="Flag when neutral is the only prediction and its probability is below "
        "this: routes when the budget is off, otherwise a reason.",
    )
    warmup_posts: int = Field(
        200,
        description="Until this many posts, the budget routes by the quantile of the scores "
        "seen so far (from the 21st post on), flagged as warming up.",
    )
    budget_window: int = Field(
        5000, ge=1, description="Recent review scores (per worker) the budget estimates from."
    )

    @field_validator("watch_labels", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return comma_separated(value)


OodAction = Literal["review", "tag", "topic"]


class OodSettings(BaseModel):
    """Posts the model cannot read (another language, code, logs, links): out-of-distribution
    signals and what happens to a flagged post. See docs/ood.md."""

    enabled: bool = Field(
        True,
        description="Compute the OOD signals for every post (the event's uncertainty.ood).",
    )
    action: OodAction = Field(
        "review",
        description="A flagged post: review (sent to the review topic past the score budget, "
        "up to max_per_minute), tag (flagged in its event only) or topic (its event also goes "
        "to topics.unsupported, not to review).",
    )
    max_per_minute: float | None = Field(
        30.0,
        gt=0,
        description="With action review: most flagged posts sent to review per minute per "
        "worker (a flood of foreign spam cannot swamp reviewers); the rest are tagged and "
        "counted. Empty: no cap.",
    )
    supported_languages: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="ISO 639-1 codes of the languages the model reads, comma-separated; empty: "
        "the model bundle's (en for the default model).",
    )
    cut: float | None = Field(
        None,
        description="Flag posts whose combined OOD score exceeds this; empty: the bundle's cut "
        "(chosen on in-distribution dev for a 1 % false-alarm rate).",
    )

    @field_validator("supported_languages", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return comma_separated(value)


class ModelSettings(BaseModel):
    path: str = Field(
        "default",
        description="'default' (the bundled model), a model bundle folder, a Hugging Face "
        "checkpoint folder, or a hub id.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where inference runs.")
    n_samples: int = Field(30, ge=1, le=1000, description="MC Dropout samples per post.")
    mc_mode: McMode = Field(
        "full",
        description="full: every dropout layer stochastic for all N samples; fast: adaptive "
        "sampling (see docs/mc-dropout.md); off: one deterministic pass.",
    )
    precision: Precision = Field(
        "auto",
        description="Matmul precision of the MC passes: auto (bf16 where the CPU or GPU has it "
        "natively, else fp32), fp32, bf16 or fp16 (autocast; see docs/mc-dropout.md).",
    )
    seed: int | None = Field(None, description="Seed for reproducible MC samples (tests).")
    max_tokens_per_forward: int = Field(
        0,
        ge=0,
        description="Most tokens in one forward pass (padded posts x width x MC copies); bounds "
        "the memory of a pass. 0: auto (on the CPU measured at start-up among 1,024-4,096, or "
        "2,048 with a seed; 131,072 on a GPU).",
    )
    max_length: int = Field(
        128, ge=8, description="Token window; longer texts are truncated for inference."
    )
    trust_remote_code: bool = Field(
        False, description="Allow a checkpoint's own Python code to run (off: safer)."
    )
    threads: int = Field(0, ge=0, description="Torch CPU threads; 0: one per core.")
    thresholds_file: Path | None = Field(
        None, description="Per-label thresholds JSON; default: the bundle's thresholds.json."
    )
    adapter: str | None = Field(
        None,
        description="Output adapter: auto (default), tuple:<i>, onnx[:<file>], "
        "encoder_onnx_head:<head.onnx or hf://owner/repo/file.onnx>; options ,labels=... "
        ",pooling=cls|mean ,normalize=true|false ,activation=sigmoid|none. See the README's "
        "model compatibility section.",
    )


class OtelSettings(BaseModel):
    """OpenTelemetry tracing: W3C trace context through the records, spans per batch and post,
    exported over OTLP/HTTP. The standard ``OTEL_*`` variables keep their meaning (endpoint,
    headers, timeout, sampler, ``OTEL_BSP_*``); see worker/tracing.py."""

    enabled: bool | None = Field(
        None,
        description="Trace the pipeline. Empty: on when an OTLP endpoint is configured (endpoint "
        "below, OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT), off "
        "otherwise. OTEL_SDK_DISABLED=true always turns it off.",
    )
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector, e.g. http://otel-collector:4318 (/v1/traces is appended "
        "unless present); wins over OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, which apply when empty.",
    )
    service_name: str = Field(
        "emotion-stream",
        description="service.name of the spans; OTEL_SERVICE_NAME (or service.name in "
        "OTEL_RESOURCE_ATTRIBUTES) wins when set.",
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces recorded (parent-based: a post follows its incoming "
        "traceparent's sampled flag); OTEL_TRACES_SAMPLER replaces this sampler when set.",
    )
    per_post_spans: bool = Field(
        True,
        description="One span per post (child of its incoming traceparent, linked to its batch); "
        "off: batch spans only, and outputs carry the incoming traceparent unchanged.",
    )


class ResolverSettings(BaseModel):
    """``emoworker resolve``: joins verdicts with their review requests (docs/feedback.md)."""

    group_id: str = Field("emotion-stream-resolver", description="Consumer group of the resolvers.")
    state_topic: str | None = Field(
        None,
        description="Compacted changelog of the pending review requests and resolved verdicts; "
        "default: <group_id>-state (created at start with the review topic's partitions).",
    )
    verdict_wait_s: float = Field(
        3600.0,
        gt=0,
        description="How long a verdict that arrived before its request waits for it; then it is "
        "dead-lettered as unknown_post.",
    )
    request_ttl_s: float = Field(
        30 * 86400.0,
        gt=0,
        description="A review request nobody answered within this is forgotten (30 days).",
    )
    keep_resolved_s: float = Field(
        7 * 86400.0,
        gt=0,
        description="How long a resolved post is remembered, so that the same verdict again is "
        "a no-op and a different one a dead letter (7 days); then it is forgotten.",
    )
    transactional_id: str | None = Field(
        None,
        description="Stable transactional id (e.g. the pod name); default: "
        "<group_id>-<worker_id>. A restarted resolver with the same id fences its old self.",
    )
    commit_interval_ms: int = Field(
        200, ge=10, description="Longest a fetched verdict waits for its transaction."
    )

    def changelog(self) -> str:
        return self.state_topic or f"{self.group_id}-state"


class WorkerSettings(BaseSettings):
    """Everything the worker reads from its environment."""

    model_config = SettingsConfigDict(
        env_prefix="EMOWORKER_",
        env_nested_delimiter="__",
        env_file=".env",
        env_parse_none_str="",  # an empty variable means "not set" (None) for optional settings
        extra="ignore",
    )

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: TopicSettings = Field(default_factory=TopicSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    review: ReviewSettings = Field(default_factory=ReviewSettings)
    ood: OodSettings = Field(default_factory=OodSettings)
    otel: OtelSettings = Field(default_factory=OtelSettings)
    headers: HeaderSettings = Field(default_factory=HeaderSettings)
    resolver: ResolverSettings = Field(default_factory=ResolverSettings)

    group_id: str = Field("emotion-stream", description="Consumer group of the workers.")
    batch_size: int = Field(64, ge=1, description="Most posts in one inference batch.")
    batch_max_wait_ms: int = Field(
        100, ge=0, description="Longest a post waits for its batch to fill."
    )
    max_in_flight_batches: int = Field(
        4,
        ge=1,
        description="Batches waiting for or in inference; fetching pauses when full "
        "(bounds memory under load).",
    )
    max_text_chars: int = Field(
        40_000,
        ge=1,
        description="Longest accepted text (Reddit allows 10,000 characters, X long posts "
        "25,000); longer posts are dead-lettered as abuse.",
    )
    max_message_bytes: int = Field(
        1_048_576, ge=1, description="Largest accepted input message; larger is dead-lettered."
    )
    max_passthrough_bytes: int = Field(
        65_536,
        ge=0,
        description="Largest copy of a post's free-form fields (metadata and unknown fields, as "
        "JSON) into its events; above it the largest are replaced by a marker "
        '{"_dropped": {"size_bytes": ..., "limit_bytes": ...}}, so that an event always fits '
        "its topic.",
    )
    event_layout: Literal["full", "compact"] = Field(
        "full",
        description="Layout of the enriched events: full (one object per label, with its "
        "threshold and predicted flag) or compact (one array per statistic, 4 digits; about "
        "half the bytes, see docs/events.md). Review requests keep the full layout.",
    )
    dead_letter_payload_bytes: int = Field(
        65_536, ge=0, description="How much of a bad message is copied into its dead letter."
    )
    follow_rollouts: bool = Field(
        True,
        description="Run the model the control topic names and swap to each new release "
        "between batches (no effect until a release is announced).",
    )
    exactly_once: bool = Field(
        False,
        description="Transactional read-process-write: outputs and offsets commit atomically "
        "(readers must use isolation_level=read_committed).",
    )
    transactional_id: str | None = Field(
        None,
        description="Stable transactional id for exactly-once mode (e.g. the pod name of a "
        "StatefulSet); default: group-host-pid.",
    )
    transaction_timeout_ms: int = Field(
        15_000, description="Open transactions of a dead worker are aborted after this."
    )
    commit_interval_ms: int = Field(1_000, ge=10, description="How often offsets are committed.")
    shutdown_grace_s: float = Field(
        30.0, description="On SIGTERM: time to drain in-flight batches and commit."
    )
    http_host: str = Field("0.0.0.0", description="Bind address of /metrics, /healthz, /readyz.")
    http_port: int = Field(8080, ge=0, description="Port of the HTTP endpoints; 0 disables them.")
    log_format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: pretty on a terminal, JSON otherwise."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe log level written."
    )
    worker_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        description="Name of this worker in logs, metrics and events.",
    )

    @model_validator(mode="after")
    def _check_security(self) -> WorkerSettings:
        k = self.kafka
        sasl_complete = k.sasl_mechanism and k.sasl_username and k.sasl_password
        if k.security_protocol.startswith("SASL") and not sasl_complete:
            raise ValueError(
                "a SASL security protocol needs EMOWORKER_KAFKA__SASL_MECHANISM, "
                "EMOWORKER_KAFKA__SASL_USERNAME and EMOWORKER_KAFKA__SASL_PASSWORD"
            )
        return self

    @classmethod
    def from_layers(cls, base: dict[str, Any], overrides: dict[str, Any]) -> WorkerSettings:
        """Validate ``base`` updated by ``overrides``; nested dicts are merged one level deep."""
        merged = dict(base)
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = merged[key] | value
            else:
                merged[key] = value
        return cls.model_validate(merged)

    def effective_transactional_id(self) -> str:
        return self.transactional_id or f"{self.group_id}-{self.worker_id}"
