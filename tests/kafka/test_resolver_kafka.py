"""The resolver on a real broker: each verdict is reflected exactly once in the final topic across
a SIGKILL of one resolver and the rebalances it causes; bad and duplicated verdicts do not change
that."""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import pytest
from support.faults import report
from support.harness import Topics, WorkerProcess
from support.kafka_cluster import KafkaCluster, create_topics, unique_topic
from support.streams import produce, read_all, values
from support.verdicts import review_request, verdict

from schemas import DeadLetter, FinalPost

pytestmark = pytest.mark.kafka


async def test_each_verdict_is_final_exactly_once_across_a_sigkill_and_rebalances(
    kafka: KafkaCluster, topics: Topics, make_settings, tmp_path: Path, capsys
) -> None:
    verdicts, final, dlq = (unique_topic(p) for p in ("verdicts", "final", "verdicts-dlq"))
    await create_topics(kafka.bootstrap_servers, [topics.review, verdicts], 4)
    settings = make_settings(
        topics=topics.settings_dict()
        | {"verdicts": verdicts, "final": final, "verdicts_dead_letter": dlq},
        resolver={
            "group_id": f"{topics.group_id}-resolver",
            "state_topic": unique_topic("resolver-state"),
            "verdict_wait_s": 600,
            "commit_interval_ms": 100,
        },
        transaction_timeout_ms=10_000,
    )
    n = 1200
    ids = [f"post-{i}" for i in range(n)]
    # the first 100 verdicts come before their requests (they wait in the state)
    await produce(kafka.bootstrap_servers, verdicts, [(i.encode(), verdict(i)) for i in ids[:100]])
    await produce(
        kafka.bootstrap_servers,
        topics.review,
        [(i.encode(), review_request(i, offset=k)) for k, i in enumerate(ids)],
    )
    r1 = WorkerProcess(settings, tmp_path / "r1.log", name="resolver-1", command="resolve")
    r2 = WorkerProcess(settings, tmp_path / "r2.log", name="resolver-2", command="resolve")
    rest = ids[100:]

    async def feed() -> None:
        """The other verdicts while the resolvers run: every 10th twice, and 5 malformed."""
        for start in range(0, len(rest), 50):
            chunk = rest[start : start + 50]
            records = [(i.encode(), verdict(i)) for i in chunk]
            records += [(i.encode(), verdict(i)) for i in chunk[::10]]
            await produce(kafka.bootstrap_servers, verdicts, records)
            await asyncio.sleep(0.15)
        bad = [(f"post-{k}".encode(), b"{not json") for k in range(5)]
        await produce(kafka.bootstrap_servers, verdicts, bad)

    async def committed_finals() -> int:
        got = await read_all(kafka.bootstrap_servers, final, idle_s=0, timeout_s=3,
                             isolation_level="read_committed")  # fmt: skip
        return len(got)

    try:
        await r1.wait_for_log('"partitions assigned"', timeout_s=120)
        await r2.wait_for_log('"partitions assigned"', timeout_s=120)
        feeding = asyncio.create_task(feed())
        while await committed_finals() < 300:
            assert r1.proc.poll() is None, r1.log_text()
            await asyncio.sleep(0.2)
        r1.kill()  # mid-transaction, most likely: it commits every 100 ms
        at_kill = await committed_finals()
        await asyncio.sleep(1)
        r1 = WorkerProcess(settings, tmp_path / "r1b.log", name="resolver-1", command="resolve")
        await feeding
        records = await read_all(kafka.bootstrap_servers, final, expect=n, idle_s=4,
                                 timeout_s=180, isolation_level="read_committed")  # fmt: skip
        letters = await read_all(kafka.bootstrap_servers, dlq, expect=5, idle_s=1,
                                 timeout_s=30, isolation_level="read_committed")  # fmt: skip
    finally:
        for r in (r1, r2):
            if r.proc.poll() is None:
                r.terminate()
        assert r2.wait(60) == 0, r2.log_text()
        assert r1.wait(60) == 0, r1.log_text()
    assert 300 <= at_kill < n, f"{at_kill} of {n} final at the kill: not mid-stream"
    events = [FinalPost.model_validate(v) for v in values(records)]
    counts = collections.Counter(e.id for e in events)
    assert set(counts) == set(ids), f"lost: {sorted(set(ids) - set(counts))[:5]}"
    assert max(counts.values()) == 1, f"twice: {[k for k, v in counts.items() if v > 1][:5]}"
    assert all(e.labels == ["joy"] and e.model_agreed for e in events)
    kinds = collections.Counter(DeadLetter.model_validate(v).error.kind for v in values(letters))
    assert kinds == {"invalid_json": 5}
    # r2 took r1's partitions over when it died (and gave some back when r1 came back)
    assert r2.log_text().count('"partitions assigned"') >= 2, r2.log_text()
    assert "resolver state restored" in r2.log_text()
    report(capsys, f"resolver SIGKILL: {at_kill} of {n} final at the kill; all once after")
