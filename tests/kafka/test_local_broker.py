"""The local single-node Kafka broker (worker.devtools.local_broker), end to end with aiokafka."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.conn import create_conn
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed
from support.kafka_cluster import create_topics, kafka_cluster, unique_topic

from worker.devtools.local_broker import (
    LocalKafka,
    SaslConfig,
    default_cache_dir,
    find_broker_processes,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(300)]


def _can_run_local_broker() -> bool:
    if shutil.which("java") is None:
        return False
    cached = (default_cache_dir() / "kafka-4.1.1" / ".complete").is_file()
    return cached or shutil.which("mvn") is not None


needs_local_broker = pytest.mark.skipif(
    not _can_run_local_broker(), reason="needs java (and mvn, or cached Kafka jars)"
)


def _processes_mentioning(workdir: Path) -> list[psutil.Process]:
    """Any live process whose command line mentions the work folder (belt and braces)."""
    needle = str(workdir)
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and needle in " ".join(
                proc.info["cmdline"] or []
            ):
                found.append(proc)
        except psutil.Error:
            continue
    return found


async def _produce(config: dict[str, Any], topic: str, count: int, prefix: str = "m") -> None:
    producer = AIOKafkaProducer(**config, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, key=f"k{i}".encode(), value=f"{prefix}{i}".encode())
            for i in range(count)
        ]
        await producer.flush()
        for fut in futures:
            await fut
    finally:
        await producer.stop()


async def _read_all(config: dict[str, Any], topic: str, expected: int) -> list[bytes]:
    """Read a topic from the beginning without a consumer group."""
    consumer = AIOKafkaConsumer(**config, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()  # fresh broker: metadata may lag
            partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        values: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(values) < expected and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            values += [m.value for msgs in batches.values() for m in msgs if m.value is not None]
        return values
    finally:
        await consumer.stop()


@needs_local_broker
async def test_produce_consume_commit_then_stop_leaves_no_jvm(tmp_path: Path) -> None:
    workdir = tmp_path / "kafka"
    broker = LocalKafka(workdir)
    started = time.monotonic()
    with broker:
        assert time.monotonic() - started < 90
        assert broker.bootstrap_servers == f"127.0.0.1:{broker.port}"
        assert broker.is_running and find_broker_processes(workdir)
        config = broker.client_config()
        topic = unique_topic("roundtrip")
        await create_topics(broker.bootstrap_servers, [topic], partitions=3)
        await _produce(config, topic, 100)

        group = unique_topic("group")
        consumer = AIOKafkaConsumer(
            topic,
            **config,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            seen: list[bytes] = []
            deadline = time.monotonic() + 60
            while len(seen) < 100 and time.monotonic() < deadline:
                batches = await consumer.getmany(timeout_ms=500)
                seen += [m.value for msgs in batches.values() for m in msgs if m.value]
            assert sorted(seen) == sorted(f"m{i}".encode() for i in range(100))
            await consumer.commit()

            tps = [TopicPartition(topic, p) for p in range(3)]
            end = await consumer.end_offsets(tps)
            committed = {tp: await consumer.committed(tp) for tp in tps}
            assert committed == end
            assert sum(end.values()) == 100
            assert sum(1 for offset in end.values() if offset > 0) >= 2  # keys spread out
        finally:
            await consumer.stop()

    assert not broker.is_running
    assert find_broker_processes(workdir) == []
    assert _processes_mentioning(workdir) == []
    assert workdir.exists()  # a folder we were given is kept
    assert "Kafka Server started" in (workdir / "logs" / "server.log").read_text()


@needs_local_broker
async def test_restart_and_crash_keep_data_and_ports(tmp_path: Path) -> None:
    with LocalKafka(tmp_path / "kafka") as broker:
        port, config = broker.port, broker.client_config()
        topic = unique_topic("durable")
        await create_topics(broker.bootstrap_servers, [topic], partitions=1)
        await _produce(config, topic, 20, prefix="before")

        broker.restart()
        assert broker.port == port
        assert sorted(await _read_all(config, topic, 20)) == sorted(
            f"before{i}".encode() for i in range(20)
        )

        await _produce(config, topic, 5, prefix="after")
        broker.kill()  # crash: SIGKILL, no clean shutdown
        assert not broker.is_running
        assert find_broker_processes(broker.workdir) == []
        broker.start()
        assert broker.port == port
        values = await _read_all(config, topic, 25)
        assert len(values) == 25
        assert {v for v in values if v.startswith(b"after")} == {
            f"after{i}".encode() for i in range(5)
        }


@needs_local_broker
@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "PLAIN"])
async def test_sasl_right_credentials_work_wrong_ones_fail_fast(
    mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    sasl = SaslConfig(mechanism, "alice", "alice-secret")  # type: ignore[arg-type]
    with LocalKafka(sasl=sasl) as broker:
        workdir = broker.workdir
        config = broker.client_config()
        assert config["security_protocol"] == "SASL_PLAINTEXT"
        topic = unique_topic("sasl")
        auth = {k: v for k, v in config.items() if k != "bootstrap_servers"}
        await create_topics(broker.bootstrap_servers, [topic], partitions=1, **auth)
        await _produce(config, topic, 5)
        assert sorted(await _read_all(config, topic, 5)) == [f"m{i}".encode() for i in range(5)]

        host, port = broker.bootstrap_servers.split(":")
        for bad in (
            {**config, "sasl_plain_password": "wrong-secret"},
            {**config, "sasl_plain_username": "mallory"},
        ):
            # The connection itself reports the authentication error ...
            started = time.monotonic()
            with pytest.raises(SaslAuthenticationFailed):
                conn = await create_conn(
                    host,
                    int(port),
                    security_protocol="SASL_PLAINTEXT",
                    sasl_mechanism=mechanism,
                    sasl_plain_username=bad["sasl_plain_username"],
                    sasl_plain_password=bad["sasl_plain_password"],
                    request_timeout_ms=10_000,
                )
                conn.close()
            # ... while producers/consumers wrap it into "Unable to bootstrap" (logged first).
            caplog.clear()
            producer = AIOKafkaProducer(**bad, request_timeout_ms=10_000)
            with (
                caplog.at_level(logging.WARNING, logger="aiokafka"),
                pytest.raises(KafkaConnectionError),
            ):
                await producer.start()
            await producer.stop()
            assert time.monotonic() - started < 20
            assert "uthentication" in caplog.text

    assert not workdir.exists()  # a temp folder the broker created is removed on stop
    assert _processes_mentioning(workdir) == []


@needs_local_broker
def test_kafka_cluster_prefers_env_then_local(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "example.invalid:9092")
    with kafka_cluster() as cluster:
        assert (cluster.kind, cluster.bootstrap_servers, cluster.broker) == (
            "external",
            "example.invalid:9092",
            None,
        )

    monkeypatch.delenv("KAFKA_BOOTSTRAP_SERVERS")
    monkeypatch.setattr("support.kafka_cluster.docker_available", lambda timeout=5.0: False)
    with kafka_cluster() as cluster:
        assert cluster.kind == "local"
        assert cluster.broker is not None and cluster.broker.is_running
        assert cluster.bootstrap_servers == cluster.broker.bootstrap_servers
        workdir = cluster.broker.workdir
    assert not workdir.exists()
    assert _processes_mentioning(workdir) == []


@needs_local_broker
def test_jvm_of_a_crashed_session_is_killed_on_next_start(tmp_path: Path) -> None:
    workdir = tmp_path / "kafka"
    script = (
        "import os, sys; from pathlib import Path\n"
        "from worker.devtools.local_broker import LocalKafka\n"
        "k = LocalKafka(Path(sys.argv[1])).start()\n"
        "print(k.pid, flush=True)\n"
        "os.kill(os.getpid(), 9)  # no atexit, no stop(): the JVM is orphaned\n"
    )
    crashed = subprocess.run(
        [sys.executable, "-c", script, str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert crashed.returncode == -9, crashed.stderr
    orphan_pid = int(crashed.stdout.split()[-1])
    assert psutil.pid_exists(orphan_pid)
    assert (workdir / "kafka.pid").is_file()

    with LocalKafka(workdir) as broker:
        assert not psutil.pid_exists(orphan_pid)
        assert [p.pid for p in find_broker_processes(workdir)] == [broker.pid]
    assert _processes_mentioning(workdir) == []
