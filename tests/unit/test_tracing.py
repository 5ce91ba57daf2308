"""Tracing: W3C trace context from the input headers to the outputs, the span tree, settings."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from worker.settings import OtelSettings, WorkerSettings
from worker.tracing import Tracing, kafka_attributes, traceparent_of, traces_url

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"
ATTRIBUTES = kafka_attributes("posts", 3, 42, "emotion-stream")


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("OTEL_", "EMOWORKER_OTEL")):
            monkeypatch.delenv(name)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


def in_memory(exporter: InMemorySpanExporter, per_post_spans: bool = True) -> Tracing:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing.with_provider(provider, per_post_spans)


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    tracing = in_memory(exporter)
    yield tracing
    tracing.shutdown()


def finished(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


def test_post_continues_the_incoming_traceparent(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    batch = tracing.start_batch(7, 2)
    assert batch is not None
    headers = [("key", b"x"), ("traceparent", TRACEPARENT.encode()), ("tracestate", b"ro=1,co=2")]
    post = tracing.start_post(headers, 1_700_000_000_000_000_000, ATTRIBUTES, batch)
    assert post is not None
    outgoing = dict(post.headers())
    post.end("review")
    batch.end()

    (span,) = finished(exporter, "emoworker.process")
    trace_id, span_id = ids(span)
    assert trace_id == TRACE
    assert span.parent is not None and span.parent.is_remote
    assert f"{span.parent.span_id:016x}" == PARENT
    assert span.kind is SpanKind.CONSUMER
    assert span.start_time == 1_700_000_000_000_000_000
    assert span.attributes is not None
    assert span.attributes["emoworker.outcome"] == "review"
    assert span.attributes["messaging.kafka.offset"] == 42
    assert span.attributes["messaging.destination.partition.id"] == "3"
    assert span.status.status_code is StatusCode.UNSET

    assert set(outgoing) == {"traceparent", "tracestate"}
    assert outgoing["traceparent"] == f"00-{TRACE}-{span_id}-01".encode()
    assert outgoing["tracestate"] == b"ro=1,co=2"

    (batch_span,) = finished(exporter, "emoworker.batch")
    assert batch_span.parent is None
    assert ids(batch_span)[0] != TRACE  # the batch is the root of a trace of its own
    assert batch_span.attributes == {"emoworker.batch.number": 7, "emoworker.batch.messages": 2}
    (link,) = span.links
    assert link.context.span_id == batch_span.context.span_id  # type: ignore[union-attr]
    assert link.context.trace_id == batch_span.context.trace_id  # type: ignore[union-attr]


def test_stages_are_children_of_the_batch(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    batch = tracing.start_batch(1, 64, start_ns=1_000)
    assert batch is not None
    batch.stage("consume", start_ns=1_000).end()
    with batch.stage("infer"):
        pass
    with pytest.raises(RuntimeError), batch.stage("publish"):
        raise RuntimeError("broker gone")
    batch.end()

    (batch_span,) = finished(exporter, "emoworker.batch")
    assert batch_span.start_time == 1_000
    stages = {span.name: span for span in exporter.get_finished_spans() if span is not batch_span}
    assert set(stages) == {"consume", "infer", "publish"}
    for stage in stages.values():
        assert stage.parent is not None
        assert stage.parent.span_id == batch_span.context.span_id  # type: ignore[union-attr]
        assert ids(stage)[0] == ids(batch_span)[0]
    assert stages["consume"].start_time == 1_000
    assert stages["infer"].status.status_code is StatusCode.UNSET
    assert stages["publish"].status.status_code is StatusCode.ERROR
    assert stages["publish"].status.description == "RuntimeError: broker gone"
    assert stages["publish"].events[0].name == "exception"


def test_post_without_traceparent_starts_a_new_trace(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    post = tracing.start_post(None, 5, {}, None)
    assert post is not None
    outgoing = dict(post.headers())
    post.end("enriched")
    (span,) = finished(exporter, "emoworker.process")
    trace_id, span_id = ids(span)
    assert span.parent is None and span.links == ()
    assert set(outgoing) == {"traceparent"}
    version, out_trace, out_span, flags = outgoing["traceparent"].decode().split("-")
    assert (version, out_trace, out_span) == ("00", trace_id, span_id)
    assert int(flags, 16) & 1  # sampled (the SDK also sets W3C's "random" bit on new roots)


@pytest.mark.parametrize(
    "value",
    [
        b"garbage",
        b"00-" + TRACE.encode() + b"-" + PARENT.encode(),  # no flags
        f"00-{'0' * 32}-{PARENT}-01".encode(),  # all-zero trace id
        f"ff-{TRACE}-{PARENT}-01".encode(),  # forbidden version
        f"00-{TRACE.upper()}-{PARENT}-01".encode(),  # upper case hex
        b"00-\xff\xfe" + TRACE.encode()[2:] + b"-" + PARENT.encode() + b"-01",  # bad UTF-8
        b"",
    ],
)
def test_malformed_traceparent_starts_a_new_root(
    tracing: Tracing, exporter: InMemorySpanExporter, value: bytes
) -> None:
    post = tracing.start_post([("traceparent", value)], 5, {}, None)
    assert post is not None
    post.end("enriched")
    (span,) = finished(exporter, "emoworker.process")
    assert span.parent is None
    assert ids(span)[0] != TRACE


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["traceparent", "TraceParent", "tracestate", "other"]),
            st.one_of(st.none(), st.binary(max_size=80)),
        ),
        max_size=4,
    )
)
def test_any_headers_give_a_trace_and_never_raise(headers: list[tuple[str, bytes | None]]) -> None:
    tracing = Tracing.with_provider(TracerProvider())
    post = tracing.start_post(headers, 5, {}, tracing.start_batch(1, 1))
    assert post is not None
    key, value = post.headers()[0]
    assert key == "traceparent"
    assert re.fullmatch(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-0[0-3]", value)
    post.end("enriched")


def test_error_and_dead_letter_outcome(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    post = tracing.start_post([("traceparent", TRACEPARENT.encode())], 5, {}, None)
    assert post is not None
    post.end("invalid_json", ValueError("not JSON"))
    (span,) = finished(exporter, "emoworker.process")
    assert span.attributes is not None and span.attributes["emoworker.outcome"] == "invalid_json"
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: not JSON"
    (event,) = span.events
    assert event.name == "exception" and event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"


def test_without_per_post_spans_the_incoming_context_passes_through(
    exporter: InMemorySpanExporter,
) -> None:
    tracing = in_memory(exporter, per_post_spans=False)
    headers = [("traceparent", TRACEPARENT.encode()), ("tracestate", b"ro=1")]
    post = tracing.start_post(headers, 5, {}, None)
    assert post is not None
    assert post.headers() == [("traceparent", TRACEPARENT.encode()), ("tracestate", b"ro=1")]
    post.end("enriched")
    assert tracing.start_post([("other", b"1")], 5, {}, None) is None
    assert exporter.get_finished_spans() == ()


def test_sampled_out_parent_is_not_recorded_but_propagated(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    unsampled = f"00-{TRACE}-{PARENT}-00"
    post = tracing.start_post([("traceparent", unsampled.encode())], 5, {}, None)
    assert post is not None
    traceparent = dict(post.headers())["traceparent"].decode()
    post.end("enriched")
    assert exporter.get_finished_spans() == ()
    assert traceparent.startswith(f"00-{TRACE}-") and traceparent.endswith("-00")
    assert traceparent.split("-")[2] != PARENT


def test_traceparent_of() -> None:
    assert traceparent_of([("a", b"1"), ("TRACEPARENT", TRACEPARENT.encode())]) == TRACEPARENT
    assert traceparent_of([("traceparent", None)]) is None
    assert traceparent_of(None) is None


def test_disabled_returns_none_and_creates_nothing() -> None:
    tracing = Tracing.from_settings(OtelSettings(), "w-1")
    assert not tracing.enabled and tracing.provider is None
    assert tracing.start_batch(1, 1) is None
    assert tracing.start_post([("traceparent", TRACEPARENT.encode())], 5, {}, None) is None
    tracing.shutdown()


def otel(**values: object) -> OtelSettings:
    return OtelSettings.model_validate(values)


def test_enabled_only_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not Tracing.from_settings(otel(), "w").enabled
    assert not Tracing.from_settings(otel(endpoint="http://c:4318", enabled=False), "w").enabled
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.setenv(name, "http://collector:4318")
        tracing = Tracing.from_settings(otel(), "w")
        assert tracing.enabled
        tracing.shutdown()
        monkeypatch.delenv(name)
    tracing = Tracing.from_settings(otel(endpoint="http://collector:4318"), "w")
    assert tracing.enabled
    tracing.shutdown()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "TRUE")
    assert not Tracing.from_settings(otel(endpoint="http://collector:4318"), "w").enabled
    assert not Tracing.from_settings(otel(enabled=True), "w").enabled


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOWORKER_OTEL__ENDPOINT", "http://collector:4318")
    monkeypatch.setenv("EMOWORKER_OTEL__SAMPLE_RATIO", "0.25")
    monkeypatch.setenv("EMOWORKER_OTEL__PER_POST_SPANS", "false")
    settings = WorkerSettings().otel
    assert settings.endpoint == "http://collector:4318" and settings.enabled is None
    assert settings.sample_ratio == 0.25 and not settings.per_post_spans
    tracing = Tracing.from_settings(settings, "pod-3")
    assert tracing.enabled and not tracing.per_post_spans
    assert tracing.provider is not None
    sampler = tracing.provider.sampler.get_description()
    assert sampler.startswith("ParentBased{root:TraceIdRatioBased{0.25}")
    resource = tracing.provider.resource.attributes
    assert resource["service.name"] == "emotion-stream"
    assert resource["service.instance.id"] == "pod-3"
    tracing.shutdown()


def test_standard_variables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "emotions-eu")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    tracing = Tracing.from_settings(otel(enabled=True, service_name="ignored"), "w")
    assert tracing.provider is not None
    assert tracing.provider.resource.attributes["service.name"] == "emotions-eu"
    assert tracing.provider.sampler.get_description() == "AlwaysOffSampler"
    tracing.shutdown()


def test_traces_url() -> None:
    assert traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/") == "http://collector:4318/v1/traces"
    assert traces_url("https://c/otlp/v1/traces") == "https://c/otlp/v1/traces"
