"""The command line and the generated documentation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.docs import CONFIG_DOC, START, with_reference

REPO = Path(__file__).resolve().parents[2]
COMMANDS = [
    "run",
    "classify",
    "train",
    "evaluate",
    "bench",
    "topics",
    "produce",
    "replay",
    "schema",
    "resolve",
    "learn",
    "rollout",
    "simulate-feedback",
]


def emoworker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"COLUMNS": "120", "PATH": "/usr/bin:/bin", "HOME": str(Path.home())},
    )  # fmt: skip


def test_help_lists_every_command() -> None:
    result = emoworker("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert f" {command} " in result.stdout, command
    topics = emoworker("topics", "--help")
    assert "create" in topics.stdout and "describe" in topics.stdout


def test_errors_are_one_clear_line() -> None:
    result = emoworker("classify", "--input", "/nonexistent/posts.jsonl")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "does not exist" in result.stderr


def test_a_bad_setting_names_the_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "schema", "social_post"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "EMOWORKER_BATCH_SIZE": "zero"},
    )  # fmt: skip
    # the schema command needs no settings: it still works
    assert result.returncode == 0
    bad = subprocess.run(
        [sys.executable, "-m", "worker.cli", "classify", "--input", "/dev/null"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "EMOWORKER_BATCH_SIZE": "zero"},
    )  # fmt: skip
    assert bad.returncode == 1
    assert "EMOWORKER_BATCH_SIZE" in bad.stderr
    assert bad.stderr.count("\n") == 1


def test_configuration_reference_is_current() -> None:
    text = CONFIG_DOC.read_text(encoding="utf-8")
    assert text == with_reference(text), f"{CONFIG_DOC} is stale: run `make docs`"
    # one generated copy, in docs/ only: the README links to it instead
    assert START not in (REPO / "README.md").read_text(encoding="utf-8")


def test_schema_command_prints_every_schema() -> None:
    result = emoworker("schema")
    assert result.returncode == 0
    for title in ("SocialPost", "EnrichedPost", "ReviewRequest", "DeadLetter"):
        assert f'"title": "{title}"' in result.stdout


def test_options_override_the_settings_and_none_leaves_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker.cli import ModelOptions, load_settings

    monkeypatch.setenv("EMOWORKER_MODEL__N_SAMPLES", "12")
    monkeypatch.setenv("EMOWORKER_KAFKA__BOOTSTRAP_SERVERS", "env:9092")
    given = ModelOptions(
        path="some/bundle",
        mc_mode="fast",
        precision="fp32",
        adapter="tuple:1",
        trust_remote_code=True,
        seed=5,
    )
    settings = load_settings({"batch_size": 7, "kafka.bootstrap_servers": None}, given)
    model = settings.model
    assert (model.path, model.mc_mode, model.precision, model.adapter) == (
        "some/bundle",
        "fast",
        "fp32",
        "tuple:1",
    )
    assert model.trust_remote_code is True and model.seed == 5
    assert model.n_samples == 12, "not given: the environment's value"
    assert settings.kafka.bootstrap_servers == "env:9092"
    assert settings.batch_size == 7
    with pytest.raises(ValidationError):
        load_settings(model=ModelOptions(n_samples=0))  # validated again
