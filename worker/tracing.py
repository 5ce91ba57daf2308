"""OpenTelemetry tracing of the pipeline: W3C trace context in, spans per batch and post, out.

The pipeline owns one ``Tracing``:

- ``Tracing.from_settings(settings.otel, worker_id)``: spans go to an OTLP/HTTP exporter behind a
  ``BatchSpanProcessor`` (it exports from its own thread and drops spans when its queue is full,
  so the event loop never waits on a collector) when tracing is configured (``tracing_enabled``);
  otherwise ``Tracing.disabled()``. ``Tracing.with_provider(provider)`` uses a provider of the
  caller's (tests: an in-memory exporter).
- ``start_batch(number, messages, start_ns=None) -> BatchTrace | None``: span ``emoworker.batch``,
  the root of its own trace; ``BatchTrace.stage("infer", start_ns=None) -> StageSpan`` a child.
  Both end with ``end(error=None)``, or as context managers (an exception sets an error status).
- ``start_post(headers, start_ns, attributes, batch) -> PostTrace | None``: span
  ``emoworker.process`` (kind CONSUMER) from the time the record was consumed, child of the
  record's ``traceparent``/``tracestate`` headers (a missing or malformed one starts a new trace),
  linked to the batch span. ``PostTrace.headers()`` gives the ``traceparent``/``tracestate`` of
  its output records; ``PostTrace.end(outcome, error=None)``. ``kafka_attributes`` gives the
  messaging attributes of a record. With ``per_post_spans`` off no post span is made, and a post
  with a valid incoming traceparent gets a ``PostTrace`` whose ``headers()`` pass it on unchanged.
- ``shutdown()``: flushes and stops the exporter; it blocks up to the export timeout, so async
  code calls it through ``asyncio.to_thread``.

Disabled, ``start_batch`` and ``start_post`` return None at once, and opentelemetry is never
imported: after the worker's own imports the API adds ~13 ms, the SDK ~100 ms and the OTLP
exporter ~250 ms to the start-up (``python -X importtime``).

Cost per post (``timeit``, best of 5 x 20,000, Python 3.11, opentelemetry-sdk 1.45, a shared
2-core VM): disabled, ``start_post`` returns None in 0.07 µs. Enabled, ``start_post`` +
``headers()`` + ``end()`` with an incoming traceparent and ``kafka_attributes`` take ~36-39 µs on
the event loop (mostly the SDK's span creation and attribute checks), and the exporter's thread
spends ~43 µs per span on protobuf encoding (holding the GIL). A post whose parent is not sampled
costs ~13 µs; with ``per_post_spans`` off ~10 µs. At thousands of posts per second that is a
sizeable share of one core: lower ``sample_ratio`` (new traces) or turn ``per_post_spans`` off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, Self

import structlog

from worker import __version__
from worker.settings import OtelSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span
    from opentelemetry.util.types import AttributeValue

log = structlog.get_logger(__name__)

Headers = Sequence[tuple[str, bytes | None]]  # Kafka record headers (aiokafka's form)
W3C_HEADERS = ("traceparent", "tracestate")
TRACES_PATH = "/v1/traces"


def _env(name: str) -> str | None:
    return os.environ.get(name, "").strip() or None


def tracing_enabled(settings: OtelSettings) -> bool:
    """On when enabled, or (unset) when an OTLP endpoint is configured; OTEL_SDK_DISABLED wins."""
    if (_env("OTEL_SDK_DISABLED") or "").lower() == "true":
        return False
    if settings.enabled is not None:
        return settings.enabled
    standard = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return bool(settings.endpoint) or any(_env(name) for name in standard)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (or of a full traces URL)."""
    base = endpoint.strip().rstrip("/")
    return base if base.endswith(TRACES_PATH) else base + TRACES_PATH


def _carrier(headers: Headers | None) -> dict[str, list[str]]:
    """The W3C trace headers among Kafka record headers, values decoded (bad UTF-8 replaced)."""
    carrier: dict[str, list[str]] = {}
    for key, value in headers or ():
        name = key.lower()
        if name in W3C_HEADERS and value is not None:
            carrier.setdefault(name, []).append(value.decode("utf-8", "replace"))
    return carrier


def traceparent_of(headers: Headers | None) -> str | None:
    """The record's ``traceparent`` header as text (not validated), or None."""
    values = _carrier(headers).get("traceparent")
    return values[0] if values else None


def kafka_attributes(
    topic: str, partition: int, offset: int, group: str
) -> dict[str, AttributeValue]:
    """The messaging attributes (semantic conventions) of one consumed record."""
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.destination.name": topic,
        "messaging.destination.partition.id": str(partition),
        "messaging.kafka.offset": offset,
        "messaging.consumer.group.name": group,
    }


def _finish(span: Span, error: BaseException | None) -> None:
    if error is not None:
        from opentelemetry.trace import Status, StatusCode

        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


class StageSpan:
    """One span that ends once, with an error status when it failed; also a context manager."""

    __slots__ = ("span",)

    def __init__(self, span: Span) -> None:
        self.span = span

    def end(self, error: BaseException | None = None) -> None:
        _finish(self.span, error)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end(error)


class BatchTrace(StageSpan):
    """Span ``emoworker.batch``; its stages (consume, tokenize, infer, publish) are children."""

    __slots__ = ("_tracing",)

    def __init__(self, span: Span, tracing: Tracing) -> None:
        super().__init__(span)
        self._tracing = tracing

    def stage(self, name: str, start_ns: int | None = None) -> StageSpan:
        from opentelemetry import trace

        parent = trace.set_span_in_context(self.span)
        return StageSpan(self._tracing.tracer.start_span(name, parent, start_time=start_ns))


class PostTrace:
    """The trace of one post: its span (or, per-post spans off, its incoming context)."""

    __slots__ = ("_owned", "_tracing", "span")

    def __init__(self, span: Span, tracing: Tracing, owned: bool) -> None:
        self.span = span
        self._tracing = tracing
        self._owned = owned

    def headers(self) -> list[tuple[str, bytes]]:
        """``traceparent`` (and ``tracestate``) for this post's output records."""
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self._tracing.propagator.inject(carrier, trace.set_span_in_context(self.span))
        return [(key, value.encode()) for key, value in carrier.items()]

    def end(self, outcome: str, error: BaseException | None = None) -> None:
        """Outcome: enriched, review, or the dead-letter kind; an error sets an error status."""
        if self._owned:
            self.span.set_attribute("emoworker.outcome", outcome)
            _finish(self.span, error)


class Tracing:
    """Starts the pipeline's spans; every ``start_*`` returns None when tracing is off."""

    def __init__(self, provider: TracerProvider | None = None, per_post_spans: bool = True) -> None:
        self.provider = provider
        self.per_post_spans = per_post_spans
        self.enabled = provider is not None
        if provider is not None:
            from opentelemetry.trace import Link, SpanKind
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            self.tracer = provider.get_tracer("emoworker", __version__)
            self.propagator = TraceContextTextMapPropagator()
            self._link = Link
            self._consumer = SpanKind.CONSUMER

    @classmethod
    def disabled(cls) -> Tracing:
        return cls()

    @classmethod
    def with_provider(cls, provider: TracerProvider, per_post_spans: bool = True) -> Tracing:
        return cls(provider, per_post_spans)

    @classmethod
    def from_settings(cls, settings: OtelSettings, worker_id: str) -> Tracing:
        """OTLP/HTTP export when configured (see ``tracing_enabled``), else disabled."""
        if not tracing_enabled(settings):
            return cls.disabled()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        resource = Resource.create({SERVICE_INSTANCE_ID: worker_id})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: settings.service_name}))
        sampler = None  # OTEL_TRACES_SAMPLER set: the SDK builds the sampler it names
        if not _env("OTEL_TRACES_SAMPLER"):
            sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        provider = TracerProvider(resource=resource, sampler=sampler)
        endpoint = traces_url(settings.endpoint) if settings.endpoint else None
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        log.info(
            "tracing on",
            endpoint=endpoint or "OTEL_EXPORTER_OTLP_*",
            service=resource.attributes.get(SERVICE_NAME),
            sample_ratio=None if sampler is None else settings.sample_ratio,
            per_post_spans=settings.per_post_spans,
        )
        return cls(provider, settings.per_post_spans)

    def start_batch(
        self, number: int, messages: int, start_ns: int | None = None
    ) -> BatchTrace | None:
        if not self.enabled:
            return None
        from opentelemetry.context import Context

        attributes = {"emoworker.batch.number": number, "emoworker.batch.messages": messages}
        span = self.tracer.start_span(
            "emoworker.batch", Context(), attributes=attributes, start_time=start_ns
        )
        return BatchTrace(span, self)

    def start_post(
        self,
        headers: Headers | None,
        start_ns: int,
        attributes: Mapping[str, AttributeValue],
        batch: BatchTrace | None,
    ) -> PostTrace | None:
        """The post's span from ``start_ns``, child of its ``traceparent`` header (or a root)."""
        if not self.enabled:
            return None
        parent = self.propagator.extract(_carrier(headers))  # malformed: empty context
        if not self.per_post_spans:
            from opentelemetry import trace

            incoming = trace.get_current_span(parent)
            valid = incoming.get_span_context().is_valid
            return PostTrace(incoming, self, owned=False) if valid else None
        links = [self._link(batch.span.get_span_context())] if batch is not None else None
        span = self.tracer.start_span(
            "emoworker.process",
            parent,
            kind=self._consumer,
            attributes=attributes,
            links=links,
            start_time=start_ns,
        )
        return PostTrace(span, self, owned=True)

    def shutdown(self) -> None:
        """Export what is queued and stop the exporter (blocks up to its export timeout)."""
        if self.provider is not None:
            self.provider.shutdown()


class Traced(Protocol):
    """A consumed message as tracing sees it (``worker.inbound.Inbound``)."""

    tp: Any
    offset: int
    headers: Headers
    consumed_ns: int
    trace: PostTrace | None


def start_batch_trace(
    tracing: Tracing, number: int, items: Sequence[Traced], group: str
) -> BatchTrace | None:
    """With tracing on: a batch's span from its first message's arrival, its consume stage, and
    each message's span (``item.trace``, a child of the record's traceparent)."""
    if not tracing.enabled or not items:
        return None
    first = min(i.consumed_ns for i in items)
    batch = tracing.start_batch(number, len(items), start_ns=first)
    if batch is None:
        return None
    batch.stage("consume", start_ns=first).end()
    for item in items:
        attributes = kafka_attributes(item.tp.topic, item.tp.partition, item.offset, group)
        item.trace = tracing.start_post(item.headers, item.consumed_ns, attributes, batch)
    return batch
