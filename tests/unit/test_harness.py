"""``harness.running``: a pipeline that crashes, hangs or exits with an unexpected code on
shutdown fails the test instead of passing silently."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from support.harness import running

from worker.pipeline import Pipeline


class FakePipeline:
    """``run()`` waits for the stop request, then returns ``code``, raises, or never ends."""

    def __init__(self, code: int = 0, crash: bool = False, hang: bool = False) -> None:
        self.code, self.crash, self.hang = code, crash, hang
        self.stop = asyncio.Event()

    def request_stop(self) -> None:
        self.stop.set()

    async def run(self) -> int:
        await self.stop.wait()
        if self.crash:
            raise RuntimeError("closing the producer failed")
        if self.hang:
            await asyncio.sleep(3600)
        return self.code


def fake(**kwargs: Any) -> Pipeline:
    return cast(Pipeline, FakePipeline(**kwargs))


async def test_a_clean_stop_passes_with_exit_code_0() -> None:
    async with running(fake()) as task:
        assert not task.done()
    assert task.result() == 0


async def test_a_crash_at_shutdown_is_re_raised() -> None:
    with pytest.raises(RuntimeError, match="closing the producer failed"):
        async with running(fake(crash=True)):
            pass


async def test_a_hang_at_shutdown_fails_after_the_timeout() -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(AssertionError, match=r"did not stop within 0\.5s of the stop"):
        async with running(fake(hang=True), stop_timeout_s=0.5) as task:
            pass
    assert asyncio.get_running_loop().time() - started < 5
    assert task.cancelled()


async def test_an_unexpected_exit_code_fails_an_expected_one_passes() -> None:
    with pytest.raises(AssertionError, match="exited with 3, expected 0"):
        async with running(fake(code=3)):
            pass
    async with running(fake(code=3), expect_exit=3) as task:
        pass
    async with running(fake(code=4), expect_exit=None) as unchecked:
        pass
    assert (task.result(), unchecked.result()) == (3, 4)


async def test_the_error_of_the_block_is_the_one_reported() -> None:
    pipeline = FakePipeline(crash=True)
    with pytest.raises(ValueError, match="the test's own assertion"):
        async with running(cast(Pipeline, pipeline)):
            raise ValueError("the test's own assertion")
    assert pipeline.stop.is_set(), "stopped all the same"
