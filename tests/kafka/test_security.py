"""Security: SASL login against a real broker, secrets kept out of logs and HTTP endpoints,
TLS settings wired into the clients.

Covered elsewhere: the HTTP endpoints accept no writes and serve only /metrics, /healthz and
/readyz (test_observability.py::test_metrics_count_what_the_worker_processed); models load from
safetensors only and a checkpoint's own code runs only with model.trust_remote_code
(test_model_families.py::test_pickle_weights_are_refused,
test_remote_code_needs_the_setting and test_remote_code_is_needed_only_for_the_class_being_loaded).
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError, SaslAuthenticationFailed
from support.faults import OutputWatcher, free_port, http_get, log_events, own_broker, report
from support.harness import Topics, WorkerProcess
from support.streams import post_bytes

from worker.devtools.local_broker import LocalKafka, SaslConfig
from worker.exit_codes import EXIT_KAFKA
from worker.kafka.admin import ensure_topics
from worker.kafka.clients import connection_kwargs, probe_credentials
from worker.kafka.delivery import is_auth_error
from worker.settings import KafkaSettings, WorkerSettings

PASSWORD = "s3cret-pw-123"
WRONG_PASSWORD = "wr0ng-pw-456"
SASL = SaslConfig("SCRAM-SHA-256", "emoworker", PASSWORD)


@pytest.fixture(scope="module")
def sasl_broker() -> Iterator[LocalKafka]:
    with own_broker(sasl=SASL) as broker:
        yield broker


@pytest.fixture(autouse=True)
def worker_gets_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """harness.settings_env writes SecretStr fields as "**********" (model_dump masks them):
    hand worker processes the real password."""
    from support import harness

    masked = harness.settings_env

    def settings_env(settings: WorkerSettings) -> dict[str, str]:
        env = masked(settings)
        if settings.kafka.sasl_password is not None:
            env["EMOWORKER_KAFKA__SASL_PASSWORD"] = settings.kafka.sasl_password.get_secret_value()
        return env

    monkeypatch.setattr(harness, "settings_env", settings_env)


def sasl_settings(broker: LocalKafka, password: str, sasl: SaslConfig = SASL) -> dict[str, Any]:
    return {
        "bootstrap_servers": broker.bootstrap_servers,
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": sasl.mechanism,
        "sasl_username": sasl.username,
        "sasl_password": password,
    }


async def sasl_topics(broker: LocalKafka, topics: Topics) -> None:
    client = broker.client_config()
    await ensure_topics(client, [topics.input], 2)
    await ensure_topics(client, [topics.enriched, topics.review, topics.dead_letter], 1)


@pytest.mark.kafka
async def test_sasl_worker_logs_in_processes_and_never_shows_the_password(
    sasl_broker: LocalKafka, topics: Topics, make_settings, tmp_path: Path
) -> None:
    """SCRAM-SHA-256 login; at log level DEBUG the whole log holds the password zero times; the
    HTTP endpoints neither show it nor accept writes."""
    await sasl_topics(sasl_broker, topics)
    producer = AIOKafkaProducer(**sasl_broker.client_config(), acks="all")
    await producer.start()
    try:
        for i in range(50):
            key, value = post_bytes(i)
            await producer.send(topics.input, value, key=key)
        await producer.flush()
    finally:
        await producer.stop()
    http_port = free_port()
    settings = make_settings(
        model={"n_samples": 2},
        kafka=sasl_settings(sasl_broker, PASSWORD),
        http_host="127.0.0.1",
        http_port=http_port,
        log_level="DEBUG",
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log", name="sasl-ok")
    try:
        async with OutputWatcher(sasl_broker.client_config(), topics) as out:
            await out.wait_for(50, timeout_s=180, worker=worker)
        assert set(out.ids) == {f"post-{i}" for i in range(50)}
        base = f"http://127.0.0.1:{http_port}"
        for path in ("/metrics", "/healthz", "/readyz"):
            status, body = await asyncio.to_thread(http_get, base + path)
            assert status == 200, (path, body)
            assert PASSWORD.encode() not in body and b"s3cret" not in body, path
            assert b"sasl" not in body.lower() and b"bootstrap" not in body.lower(), path
        for method in ("POST", "PUT", "DELETE"):
            request = urllib.request.Request(f"{base}/metrics", data=b"x", method=method)
            with pytest.raises(urllib.error.HTTPError) as refused:
                await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
            assert refused.value.code == 405
        worker.terminate()
        assert await asyncio.to_thread(worker.wait, 60) == 0
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    log = worker.log_text()
    assert any(e.get("level") == "debug" for e in log_events(log)), "DEBUG lines were written"
    assert log.count(PASSWORD) == 0 and "s3cret" not in log


@pytest.mark.kafka
async def test_worker_logs_in_with_sasl_plain_enriches_and_commits(
    topics: Topics, make_settings, tmp_path: Path, capsys
) -> None:
    """The worker process itself with SASL PLAIN (a broker that offers PLAIN only): every post
    in comes out enriched once, and the group's commit covers the input."""
    plain = SaslConfig("PLAIN", "emoworker-plain", PASSWORD)
    with own_broker(sasl=plain) as broker:
        await sasl_topics(broker, topics)
        client = broker.client_config()
        n = 30
        producer = AIOKafkaProducer(**client, acks="all")
        await producer.start()
        try:
            for i in range(n):
                key, value = post_bytes(i)
                await producer.send(topics.input, value, key=key)
            await producer.flush()
        finally:
            await producer.stop()
        settings = make_settings(
            model={"n_samples": 2}, kafka=sasl_settings(broker, PASSWORD, plain)
        )
        assert settings.kafka.sasl_mechanism == "PLAIN"
        worker = WorkerProcess(settings, tmp_path / "worker.log", name="sasl-plain")
        try:
            async with OutputWatcher(client, topics) as out:
                await out.wait_for(n, timeout_s=180, worker=worker)
                await out.settle(2)
            worker.terminate()
            code = await asyncio.to_thread(worker.wait, 60)
        finally:
            if worker.proc.poll() is None:
                worker.kill()
        committed = await committed_offsets(client, topics.group_id, topics.input, 2)
    log = worker.log_text()
    assert code == 0, log[-3000:]
    assert set(out.ids) == {f"post-{i}" for i in range(n)}
    assert out.duplicates() == 0 and out.letters == []
    assert sum(committed.values()) == n, committed
    assert log.count(PASSWORD) == 0
    enriched = sum(out.ids.values())
    report(capsys, f"SASL PLAIN worker: {n} in, {enriched} enriched, committed {committed}")


async def committed_offsets(
    client: dict[str, Any], group_id: str, topic: str, partitions: int
) -> dict[int, int]:
    """The group's committed offset of each partition of ``topic`` (0 where none)."""
    consumer = AIOKafkaConsumer(**client, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        return {
            p: await consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)
        }
    finally:
        await consumer.stop()


@pytest.mark.kafka
async def test_wrong_password_is_one_clear_error_and_exit_code_2(
    sasl_broker: LocalKafka, topics: Topics, make_settings, tmp_path: Path, capsys
) -> None:
    """A rejected login is not retried: one error line, exit code 2, within seconds."""
    settings = make_settings(
        model={"n_samples": 2},
        kafka=sasl_settings(sasl_broker, WRONG_PASSWORD),
        log_level="DEBUG",
    )
    worker = WorkerProcess(settings, tmp_path / "worker.log", name="sasl-wrong")
    try:
        await worker.wait_for_log('"model ready"', timeout_s=180)
        model_ready = time.monotonic()
        code = await asyncio.to_thread(worker.wait, 60)
        exited_s = time.monotonic() - model_ready
    finally:
        if worker.proc.poll() is None:
            worker.kill()
    log = worker.log_text()
    assert code == EXIT_KAFKA, log
    assert exited_s < 20, f"took {exited_s:.1f}s to give up"
    errors = [e for e in log_events(log) if e.get("level") in ("error", "critical")]
    assert len(errors) == 1, errors
    assert "authentication failed" in errors[0]["reason"].lower()
    assert "SASL_PASSWORD" in errors[0]["reason"]  # says what to check
    assert "Kafka not reachable yet; retrying" not in log, "no retry storm"
    connects = [e for e in log_events(log) if "Unable connect to" in str(e.get("event"))]
    assert len(connects) == 1, connects  # one login attempt (aiokafka's warning), no loop
    assert "Traceback" not in log
    assert WRONG_PASSWORD not in log and PASSWORD not in log
    report(capsys, f"wrong SASL password: exit {code} {exited_s:.1f}s after the model was ready")


@pytest.mark.kafka
async def test_login_failure_is_told_apart_from_an_unreachable_cluster(
    sasl_broker: LocalKafka,
) -> None:
    """aiokafka's start() raises the same KafkaConnectionError("Unable to bootstrap ...") for
    both; probe_credentials tells them apart, so only the first is fatal."""
    wrong = KafkaSettings(**sasl_settings(sasl_broker, WRONG_PASSWORD))
    right = KafkaSettings(**sasl_settings(sasl_broker, PASSWORD))
    unreachable = KafkaSettings(
        **sasl_settings(sasl_broker, PASSWORD) | {"bootstrap_servers": f"127.0.0.1:{free_port()}"}
    )
    assert not is_auth_error(KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9)]"))
    failure = await probe_credentials(wrong)
    assert isinstance(failure, SaslAuthenticationFailed) and is_auth_error(failure)
    assert await probe_credentials(right) is None
    assert await probe_credentials(unreachable) is None


# ── TLS: settings → SSLContext (wire check only; no TLS broker) ─────────────────────────────


def _self_signed(folder: Path) -> tuple[Path, Path, str]:
    """A self-signed CA (cert, key) and its common name, made with ``cryptography`` when
    installed, else the ``openssl`` command; skips when neither is there."""
    cert, key, name = folder / "ca.pem", folder / "ca.key", "emotion-stream test CA"
    try:
        import datetime

        from cryptography import x509  # type: ignore[import-not-found]
        from cryptography.hazmat.primitives import hashes, serialization  # type: ignore[import-not-found]
        from cryptography.hazmat.primitives.asymmetric import ec  # type: ignore[import-not-found]
        from cryptography.x509.oid import NameOID  # type: ignore[import-not-found]
    except ImportError:
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("needs the cryptography package or the openssl command")
        subprocess.run(
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE"],
            check=True, capture_output=True,
        )  # fmt: skip
        return cert, key, name
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, key, name


def _ca_names(context: ssl.SSLContext) -> list[str]:
    return [
        value
        for cert in context.get_ca_certs()
        for rdn in cert["subject"]
        for field, value in rdn
        if field == "commonName"
    ]


@pytest.mark.parametrize("protocol", ["SSL", "SASL_SSL"])
def test_tls_settings_build_an_ssl_context_with_the_ca(tmp_path: Path, protocol: str) -> None:
    cert, key, name = _self_signed(tmp_path)
    sasl: dict[str, Any] = {}
    if protocol == "SASL_SSL":
        sasl = {"sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": "p"}
    kwargs = connection_kwargs(
        KafkaSettings(security_protocol=protocol, ssl_cafile=cert, **sasl)  # type: ignore[arg-type]
    )
    context = kwargs["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert kwargs["security_protocol"] == protocol
    assert _ca_names(context) == [name]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    if protocol == "SASL_SSL":
        assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
        assert kwargs["sasl_plain_password"] == "p"
    # mutual TLS (the CA doubles as a client certificate here) and no host name check
    mutual = connection_kwargs(
        KafkaSettings(
            security_protocol="SSL",
            ssl_cafile=cert,
            ssl_certfile=cert,
            ssl_keyfile=key,
            ssl_check_hostname=False,
        )
    )["ssl_context"]
    assert _ca_names(mutual) == [name] and not mutual.check_hostname
    # plaintext gets no TLS context at all
    assert "ssl_context" not in connection_kwargs(KafkaSettings())


def test_tls_settings_with_a_missing_ca_file_fail_loudly(tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, ssl.SSLError, OSError)):
        connection_kwargs(KafkaSettings(security_protocol="SSL", ssl_cafile=tmp_path / "none"))
