"""/metrics, /healthz and /readyz during a real run; the endpoints are read-only."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.harness import Topics, make_topics, running, wait_until
from support.kafka_cluster import KafkaCluster
from support.streams import post_bytes, produce, read_all, values

from worker.pipeline import Pipeline

pytestmark = pytest.mark.kafka


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(method: str, url: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def get(url: str, method: str = "GET") -> tuple[int, bytes]:
    return await asyncio.to_thread(http, method, url)


async def wait_listening(base: str) -> None:
    for _ in range(200):
        try:
            await get(f"{base}/healthz")
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"{base} never answered")


def samples(text: bytes) -> dict[str, float]:
    """name{labels} -> value, summed over label sets for each name."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


async def test_metrics_count_what_the_worker_processed(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier
) -> None:
    await make_topics(kafka, topics, partitions=2)
    good, bad = 150, [b"{oops", b"[]", b'{"id": "x"}']
    await produce(
        kafka.bootstrap_servers,
        topics.input,
        [post_bytes(i) for i in range(good)] + [(None, b) for b in bad],
    )
    settings = make_settings(http_host="127.0.0.1", http_port=free_port(), model={"n_samples": 2})
    pipeline = Pipeline(settings, classifier=test_classifier)
    async with running(pipeline):
        base = f"http://127.0.0.1:{settings.http_port}"
        await wait_listening(base)
        assert (await get(f"{base}/healthz"))[0] == 200
        enriched = values(await read_all(kafka.bootstrap_servers, topics.enriched, expect=good))
        reviews = values(await read_all(kafka.bootstrap_servers, topics.review, idle_s=1))
        await read_all(kafka.bootstrap_servers, topics.dead_letter, expect=len(bad))
        await asyncio.sleep(0.5)
        status, ready = await get(f"{base}/readyz")
        assert status == 200, ready
        status, body = await get(f"{base}/metrics")
        assert status == 200
        m = samples(body)
        # the endpoints accept no writes and expose nothing but these three paths
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert (await get(f"{base}/metrics", method))[0] == 405
        assert (await get(f"{base}/settings"))[0] == 404
        assert (await get(f"{base}/"))[0] == 404

    assert len(enriched) == good
    assert m["emoworker_posts_consumed_total"] == good + len(bad)
    assert m["emoworker_posts_enriched_total"] == good
    assert m["emoworker_posts_reviewed_total"] == len(reviews)
    assert m["emoworker_posts_dead_lettered_total"] == len(bad)
    assert m["emoworker_batch_size_count"] >= 1
    assert m["emoworker_batch_size_sum"] == good
    assert m["emoworker_mc_samples_total"] == good * 2
    assert m["emoworker_end_to_end_latency_seconds_count"] == good
    assert m["emoworker_inference_seconds_count"] == m["emoworker_batch_size_count"]
    assert m["emoworker_ready"] == 1
    assert "emoworker_consumer_lag" in body.decode()
    text = body.decode().lower()
    assert "password" not in text and "bootstrap" not in text


async def test_not_ready_until_partitions_are_assigned(make_settings, test_classifier) -> None:
    # a cluster that does not answer: the worker is alive but never ready
    settings = make_settings(
        http_host="127.0.0.1", http_port=free_port(), kafka={"bootstrap_servers": "127.0.0.1:9"}
    )
    pipeline = Pipeline(settings, classifier=test_classifier)
    async with running(pipeline):
        base = f"http://127.0.0.1:{settings.http_port}"
        await wait_listening(base)
        await asyncio.sleep(2)
        assert (await get(f"{base}/healthz"))[0] == 200
        status, body = await get(f"{base}/readyz")
        assert status == 503
        assert b"connecting to Kafka" in body


async def test_a_worker_without_partitions_is_not_ready(
    kafka: KafkaCluster, topics: Topics, make_settings, test_classifier
) -> None:
    """More workers than partitions: the one the group gives nothing is connected, alive and
    not ready ("no partitions assigned"); the one that owns the partition is ready."""
    await make_topics(kafka, topics, partitions=1)
    pipelines = {
        name: Pipeline(
            make_settings(worker_id=name, http_host="127.0.0.1", http_port=free_port()),
            classifier=test_classifier,
        )
        for name in ("first", "second")
    }
    assignments: dict[str, list[set[int]]] = {name: [] for name in pipelines}
    for name, pipeline in pipelines.items():
        original = pipeline.on_assigned

        def on_assigned(assigned, name=name, original=original):  # type: ignore[no-untyped-def]
            assignments[name].append({tp.partition for tp in assigned})
            original(assigned)

        pipeline.on_assigned = on_assigned  # type: ignore[method-assign]
    first, second = pipelines["first"], pipelines["second"]
    async with running(first):
        await wait_until(lambda: bool(first.assigned), 60, "the first worker owns the partition")
        async with running(second):
            # settled once the second worker got its (empty) share and the first its new one
            await wait_until(
                lambda: len(assignments["second"]) >= 1 and len(assignments["first"]) >= 2,
                60,
                "a rebalance with both workers in the group",
            )
            states = {name: p.ready() for name, p in pipelines.items()}
            answers = {
                name: await get(f"http://127.0.0.1:{p.settings.http_port}/readyz")
                for name, p in pipelines.items()
            }
            alive = {
                name: (await get(f"http://127.0.0.1:{p.settings.http_port}/healthz"))[0]
                for name, p in pipelines.items()
            }
    owners = [name for name, state in states.items() if state == (True, "ok")]
    assert len(owners) == 1, (states, assignments)
    (idle,) = set(pipelines) - set(owners)
    assert states[idle] == (False, "no partitions assigned")
    assert assignments[idle][-1] == set() and assignments[owners[0]][-1] == {0}
    assert answers[owners[0]][0] == 200
    assert answers[idle][0] == 503 and b"no partitions assigned" in answers[idle][1]
    assert alive == {"first": 200, "second": 200}
