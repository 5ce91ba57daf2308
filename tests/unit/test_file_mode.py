"""File mode end to end: ``emoworker classify`` on a JSON-lines file with good and bad lines."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog.testing
from support.processors import NanProcessor
from typer.testing import CliRunner

from schemas import DeadLetter, EnrichedPost
from worker.cli import app
from worker.decoding import DecodeFailure, DecodeLimits, decode_post
from worker.exit_codes import EXIT_MODEL, FatalError
from worker.file_mode import FileRunStats, classify_stream
from worker.inference.loading import Classifier
from worker.isolation import SYSTEMIC_FAILURES
from worker.processing import BatchProcessor
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 240


def good(i: int, text: str | None = None, **extra: object) -> str:
    return json.dumps({"id": f"good-{i}", "text": text or f"post number {i}, so happy!", **extra})


# (line, expected dead-letter kind or None for a good post); line numbers are 1-based positions
LINES: list[tuple[bytes, str | None]] = [
    (good(1).encode(), None),
    (b'{"id": "bad", text: "unquoted key"}', "invalid_json"),
    (good(2, "I can't believe this happened 😡").encode(), None),
    (b'{"id": "latin1", "text": "caf\xe9"}', "invalid_utf8"),
    (good(3, author="u/x", created_at="2024-01-02T03:04:05Z").encode(), None),
    (b'{"id": "blank", "text": "  \\u200b  "}', "blank_text"),
    (b'{"text": "who am I?"}', "missing_field"),
    (b'[{"id": "in-array", "text": "x"}]', "not_an_object"),
    (b"", "empty_message"),
    (good(4, "Mixed scripts: hello мир 世界").encode() + b"\r", None),  # CRLF line ending
    (b'{"id": "v2", "text": "x", "schema_version": "2"}', "unsupported_schema_version"),
    (good(5, "🎉🎉🎉").encode(), None),
    (good(6, metadata={"a": {"b": 1}}, subreddit="r/test").encode(), None),
    (b'{"id": "naive", "text": "x", "created_at": "2024-01-02T03:04:05"}', "invalid_field"),
    (b'{"id": "deep", "text": "x", "m": ' + b"[" * 40 + b"]" * 40 + b"}", "nesting_too_deep"),
    (b'{"id": "too-long", "text": "' + b"a" * 40_001 + b'"}', "text_too_long"),
    (good(7, "Thanks so much, this means a lot to me.").encode(), None),
    (b"null", "not_an_object"),
    (good(8, "I'm worried about tomorrow...").encode(), None),
    (b"   ", "invalid_json"),
    (good(9, "ok").encode(), None),
    (good(10, "Last line without a newline at the end").encode(), None),
]
GOOD_IDS = [f"good-{i}" for i in range(1, 11)]
BAD = [(number, kind) for number, (_, kind) in enumerate(LINES, 1) if kind is not None]


def input_bytes() -> bytes:
    return b"\n".join(line for line, _ in LINES)  # the last line has no newline


def cli_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("EMOWORKER_") and k not in {"COLUMNS", "LINES"}
    }
    env |= {
        "EMOWORKER_MODEL__DEVICE": "cpu",
        "EMOWORKER_MODEL__THREADS": "1",  # shared cores: one thread is much faster here
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    }
    return env


def classify_command(model_dir: Path, inp: str, out: str, dead_letter: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "worker.cli",
        "classify",
        "--input",
        inp,
        "--output",
        out,
        "--dead-letter",
        dead_letter,
        "--model",
        str(model_dir),
        "--n-samples",
        "2",
        "--seed",
        "1",
    ]


@dataclass
class CliRun:
    returncode: int
    enriched: list[bytes]
    dead_letters: list[bytes]
    stderr: str
    input_name: str


def read_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("file-mode")
    (folder / "posts.jsonl").write_bytes(input_bytes())
    return folder


@pytest.fixture(scope="module")
def cli_runs(workdir: Path, test_model_dir: Path) -> dict[str, CliRun]:
    """The two CLI runs, side by side."""
    inp, out, dl = workdir / "posts.jsonl", workdir / "out.jsonl", workdir / "dead.jsonl"
    dl_stdin = workdir / "dead-stdin.jsonl"
    commands = {
        "file": (classify_command(test_model_dir, str(inp), str(out), str(dl)), None),
        "stdin": (classify_command(test_model_dir, "-", "-", str(dl_stdin)), input_bytes()),
    }

    def call(command: list[str], stdin: bytes | None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            command,
            cwd=workdir,  # no .env of the repository is read
            env=cli_env(),
            input=stdin,
            capture_output=True,
            timeout=CLI_TIMEOUT_S,
        )

    with ThreadPoolExecutor(len(commands)) as pool:
        futures = {name: pool.submit(call, *args) for name, args in commands.items()}
        procs = {name: future.result() for name, future in futures.items()}
    return {
        "file": CliRun(
            procs["file"].returncode,
            read_lines(out.read_bytes()) if out.exists() else [],
            read_lines(dl.read_bytes()) if dl.exists() else [],
            procs["file"].stderr.decode(errors="replace"),
            str(inp),
        ),
        "stdin": CliRun(
            procs["stdin"].returncode,
            read_lines(procs["stdin"].stdout),
            read_lines(dl_stdin.read_bytes()) if dl_stdin.exists() else [],
            procs["stdin"].stderr.decode(errors="replace"),
            "-",
        ),
    }


@pytest.fixture
def file_run(cli_runs: dict[str, CliRun]) -> CliRun:
    return cli_runs["file"]


@pytest.fixture
def stdin_run(cli_runs: dict[str, CliRun]) -> CliRun:
    return cli_runs["stdin"]


@pytest.fixture(params=["file", "stdin"])
def run(request: pytest.FixtureRequest) -> CliRun:
    return request.getfixturevalue(f"{request.param}_run")


def test_expected_lines_agree_with_decode_post() -> None:
    """The table above is right about each line (so a CLI failure is the CLI's)."""
    limits = DecodeLimits()
    for number, (line, kind) in enumerate(LINES, 1):
        result = decode_post(line.rstrip(b"\r"), limits)
        actual = result.kind if isinstance(result, DecodeFailure) else None
        assert actual == kind, f"line {number}"


def test_exit_code_zero(run: CliRun) -> None:
    assert run.returncode == 0, run.stderr


def test_output_has_exactly_the_good_posts_in_input_order(run: CliRun) -> None:
    events = [EnrichedPost.model_validate_json(line) for line in run.enriched]
    assert [e.id for e in events] == GOOD_IDS
    good_lines = [n for n, (_, kind) in enumerate(LINES, 1) if kind is None]
    for event, number in zip(events, good_lines, strict=True):
        assert event.source is not None
        assert event.source.model_dump() == {"path": run.input_name, "line": number}
        assert event.model.n_samples == 2 and event.model.mc_mode == "full"
        assert event.uncertainty.n_samples == 2
        assert len(event.emotions) == 28
        original = orjson.loads(LINES[number - 1][0].rstrip(b"\r"))
        assert event.post.text == original["text"]
    sixth = events[GOOD_IDS.index("good-6")]
    assert sixth.post.model_extra == {"subreddit": "r/test"}


def test_dead_letters_carry_line_number_and_kind(run: CliRun) -> None:
    letters = [DeadLetter.model_validate_json(line) for line in run.dead_letters]
    assert [(letter.source.model_dump()["line"], letter.error.kind) for letter in letters] == BAD
    for letter in letters:
        assert letter.source.model_dump()["path"] == run.input_name
        assert letter.error.message
        original = LINES[letter.source.model_dump()["line"] - 1][0]
        assert letter.payload.size_bytes == len(original)
        if original:
            assert letter.payload.sha256 == hashlib.sha256(original).hexdigest()
        assert not letter.payload.truncated
    latin1 = next(x for x in letters if x.error.kind == "invalid_utf8")
    assert latin1.payload.encoding == "base64"


def test_summary_line_on_stderr(run: CliRun) -> None:
    assert f"{len(LINES)} lines: {len(GOOD_IDS)} enriched" in run.stderr
    assert f"{len(BAD)} dead-lettered" in run.stderr


def test_stdout_and_file_output_agree(file_run: CliRun, stdin_run: CliRun) -> None:
    """Same seed, same input: the same classification whichever way the posts came in."""
    from_file = [orjson.loads(x) for x in file_run.enriched]
    from_stdin = [orjson.loads(x) for x in stdin_run.enriched]
    assert [e["predicted_labels"] for e in from_file] == [e["predicted_labels"] for e in from_stdin]
    assert [e["emotions"] for e in from_file] == [e["emotions"] for e in from_stdin]


MISSING_NAME = "a-deliberately-long-file-name-so-the-error-message-exceeds-eighty-columns.jsonl"


@pytest.fixture
def missing_input_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """``classify`` of a file that does not exist (in process: it fails before any model)."""
    from typer.testing import CliRunner

    from worker.cli import app

    monkeypatch.delenv("COLUMNS", raising=False)
    missing = tmp_path / MISSING_NAME
    result = CliRunner().invoke(app, ["classify", "--input", str(missing), "--output", "-"])
    return missing, result


def test_missing_input_file_is_an_error(missing_input_run: Any) -> None:
    _, result = missing_input_run
    assert result.exit_code == 1
    assert "does not exist" in result.stderr
    assert result.stdout == ""


def test_missing_input_file_error_is_one_line(missing_input_run: Any) -> None:
    missing, result = missing_input_run
    assert result.stderr == f"error: input file {missing} does not exist\n"


# -- in process: file mode and decode_post agree -------------------------------------------------


def test_file_mode_and_decode_post_give_the_same_dead_letters(
    test_classifier: Classifier, test_model_dir: Path, one_torch_thread: None
) -> None:
    settings = WorkerSettings.model_validate(
        {
            "model": {"path": str(test_model_dir), "n_samples": 2, "seed": 1, "device": "cpu"},
            "worker_id": "in-process",
        }
    )
    processor = BatchProcessor(test_classifier, settings)
    limits = DecodeLimits(settings.max_message_bytes, settings.max_text_chars)
    enriched, dead = io.BytesIO(), io.BytesIO()
    stats = classify_stream(
        io.BytesIO(input_bytes()),
        "mem.jsonl",
        processor,
        limits,
        enriched.write,
        dead.write,
        batch_size=3,  # several batches, with dead letters between them
    )
    letters = [DeadLetter.model_validate_json(x) for x in read_lines(dead.getvalue())]
    by_line = {letter.source.model_dump()["line"]: letter for letter in letters}

    for number, (line, _) in enumerate(LINES, 1):
        decoded = decode_post(line.rstrip(b"\r"), limits)
        if isinstance(decoded, DecodeFailure):
            letter = by_line.pop(number)
            assert letter.error.kind == decoded.kind
            assert letter.error.message == decoded.message
            assert letter.error.field == decoded.field
            assert letter.worker_id == "in-process"
    assert by_line == {}, "no dead letter for a line decode_post accepts"

    ids = [orjson.loads(x)["id"] for x in read_lines(enriched.getvalue())]
    assert ids == GOOD_IDS
    assert stats.lines == len(LINES)
    assert stats.enriched == len(GOOD_IDS)
    assert stats.dead_lettered == len(BAD)
    expected_kinds: dict[str, int] = {}
    for _, kind in BAD:
        expected_kinds[kind] = expected_kinds.get(kind, 0) + 1
    assert stats.dead_letter_kinds == expected_kinds


# ── posts the model gives NaN scores ────────────────────────────────────────────────────────


def classify_lines(
    lines: list[str], processor: BatchProcessor, batch_size: int
) -> tuple[FileRunStats, io.BytesIO, io.BytesIO]:
    """``classify_stream`` over ``lines`` in memory: its stats, enriched and dead-letter output."""
    enriched, dead = io.BytesIO(), io.BytesIO()
    stats = classify_stream(
        io.BytesIO("\n".join(lines).encode()),
        "mem.jsonl",
        processor,
        DecodeLimits(1_000_000, 10_000),
        enriched.write,
        dead.write,
        batch_size=batch_size,
    )
    return stats, enriched, dead


def nan_settings(test_model_dir: Path) -> WorkerSettings:
    return WorkerSettings.model_validate(
        {
            "model": {"path": str(test_model_dir), "n_samples": 2, "seed": 1, "device": "cpu"},
            "worker_id": "in-process",
        }
    )


def test_posts_with_nan_scores_are_dead_lettered_and_the_rest_enriched(
    test_classifier: Classifier, test_model_dir: Path, one_torch_thread: None
) -> None:
    """No event with a null probability: a post the model gives NaN scores fails alone and
    becomes a ``processing_error`` dead letter with its line; its batch-mates are enriched from
    the batch's own pass (only the NaN posts are run again, alone)."""
    lines = [good(i, "a zebra ate my homework" if i in (2, 5) else None) for i in range(1, 8)]
    processor = NanProcessor(test_classifier, nan_settings(test_model_dir))
    # batches of 4: both NaN posts in batches with good ones
    stats, enriched, dead = classify_lines(lines, processor, batch_size=4)
    events = [EnrichedPost.model_validate_json(x) for x in read_lines(enriched.getvalue())]
    assert [e.id for e in events] == [f"good-{i}" for i in (1, 3, 4, 6, 7)]
    for event in events:
        assert all(math.isfinite(e.probability) for e in event.emotions)
    letters = [DeadLetter.model_validate_json(x) for x in read_lines(dead.getvalue())]
    assert [letter.source.model_dump()["line"] for letter in letters] == [2, 5]
    for letter in letters:
        assert letter.error.kind == "processing_error"
        assert letter.error.message.startswith("inference failed for this post: NonFiniteScores")
        assert f"for 1 of 1 posts (the first: {test_classifier.label_names[3]})" in (
            letter.error.message
        )
        assert letter.payload.data is not None and "zebra" in letter.payload.data
    assert (stats.enriched, stats.dead_lettered) == (5, 2)
    assert stats.dead_letter_kinds == {"processing_error": 2}
    assert processor.inferred == [4, 1, 3, 1]  # each batch once, each NaN post once more alone


def test_a_small_file_whose_every_post_fails_stops_with_exit_4(
    test_classifier: Classifier,
    test_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    """Fewer posts than SYSTEMIC_FAILURES, every one NaN: the posts are dead-lettered and
    ``emoworker classify`` exits 4 (the model cannot run), not 0."""
    inp, out, dead = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "dead.jsonl"
    inp.write_text("\n".join(good(i, f"zebra number {i}") for i in range(3)) + "\n")
    monkeypatch.setattr("worker.processing.BatchProcessor", NanProcessor)
    monkeypatch.setattr("worker.logs.configure_logging", lambda *_a, **_k: None)
    args = ["classify", "--input", str(inp), "--output", str(out), "--dead-letter", str(dead)]
    args += ["--model", str(test_model_dir), "--n-samples", "2", "--seed", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == EXIT_MODEL, result.output
    assert "inference failed for every post" in result.output
    assert out.read_bytes() == b""
    letters = [DeadLetter.model_validate_json(x) for x in read_lines(dead.read_bytes())]
    assert [letter.source.model_dump()["line"] for letter in letters] == [1, 2, 3]


def test_a_model_that_fails_every_post_stops_file_mode(
    test_classifier: Classifier, test_model_dir: Path, one_torch_thread: None
) -> None:
    """Every post NaN: after SYSTEMIC_FAILURES posts in a row the run stops (exit 4) instead of
    dead-lettering the whole file."""
    n = SYSTEMIC_FAILURES + 6
    lines = [good(i, f"zebra number {i}") for i in range(n)]
    processor = NanProcessor(test_classifier, nan_settings(test_model_dir))
    dead = io.BytesIO()
    with pytest.raises(FatalError) as caught:
        classify_stream(
            io.BytesIO("\n".join(lines).encode()),
            "mem.jsonl",
            processor,
            DecodeLimits(1_000_000, 10_000),
            io.BytesIO().write,
            dead.write,
            batch_size=32,
        )
    assert caught.value.exit_code == EXIT_MODEL
    assert "NonFiniteScores" in str(caught.value)
    # the first batch's 32 posts were dead-lettered; the run stopped in the second batch, whose
    # posts are written nowhere (as the Kafka worker commits nothing past them)
    assert len(read_lines(dead.getvalue())) == 32


def test_dead_letters_are_written_in_input_order_whatever_their_cause(
    test_classifier: Classifier, test_model_dir: Path, one_torch_thread: None
) -> None:
    """A post that fails inference and the bad lines read after it, before its batch ran: the
    dead-letter file lists them by line (2, 3, 5, 6), as it would without batching, not the bad
    lines first (3, 5, 2, 6 before the fix)."""
    lines = [
        good(1),
        good(2, "a zebra ate my homework"),
        "{not json",
        good(4),
        '{"id": "x"}',
        good(6, "a zebra again"),
        good(7),
    ]
    processor = NanProcessor(test_classifier, nan_settings(test_model_dir))
    # batches of 3: lines 1, 2, 4 in the first; 6, 7 in the second
    stats, enriched, dead = classify_lines(lines, processor, batch_size=3)
    letters = [DeadLetter.model_validate_json(x) for x in read_lines(dead.getvalue())]
    assert [letter.source.model_dump()["line"] for letter in letters] == [2, 3, 5, 6]
    assert [letter.error.kind for letter in letters] == [
        "processing_error",
        "invalid_json",
        "missing_field",
        "processing_error",
    ]
    ids = [orjson.loads(x)["id"] for x in read_lines(enriched.getvalue())]
    assert ids == ["good-1", "good-4", "good-7"]
    assert (stats.enriched, stats.dead_lettered) == (3, 4)


def test_the_dead_letter_log_names_its_source_in_flat_fields(
    test_classifier: Classifier, test_model_dir: Path, one_torch_thread: None
) -> None:
    """A log line a collector can index: the failed post's path and line (in Kafka mode its
    topic, partition and offset) as top-level fields, not one nested ``source`` object."""
    processor = NanProcessor(test_classifier, nan_settings(test_model_dir))
    with structlog.testing.capture_logs() as logs:
        classify_lines([good(1), good(2, "a zebra ate my homework")], processor, batch_size=2)
    [line] = [e for e in logs if e["event"] == "post dead-lettered: inference failed"]
    assert (line["path"], line["line"]) == ("mem.jsonl", 2)
    assert "source" not in line
    assert line["error"].startswith("NonFiniteScores")
