"""Runtime apart from tooling: `run` and `classify` need none of the optional extras, a tooling
command whose extra is missing says in one line what to install, and no runtime module imports
the tooling."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from worker.extras import EXTRAS

REPO = Path(__file__).resolve().parents[2]
WORKER = REPO / "worker"
TOOLING = ("worker.training", "worker.bench", "worker.demo", "worker.devtools")
# every package an extra adds, by import name: the runtime must work with all of them blocked
BLOCKED = sorted({module for packages in EXTRAS.values() for module, _ in packages})
# None in sys.modules makes every import of the name fail, as if it were not installed
PRELUDE = f"import sys\nfor name in {BLOCKED!r}:\n    sys.modules[name] = None\n"


def blocked_python(code: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOWORKER_")}
    env |= {
        "COLUMNS": "200",
        "EMOWORKER_MODEL__DEVICE": "cpu",
        "EMOWORKER_MODEL__THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    }
    return subprocess.run(
        [sys.executable, "-c", PRELUDE + code],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def emoworker_blocked(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return blocked_python(
        f"sys.argv = ['emoworker', *{list(args)!r}]\nfrom worker.cli import main\nmain()", cwd
    )


def test_extras_are_those_of_pyproject() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {
        extra: {Requirement(r).name for r in requirements}
        for extra, requirements in project["optional-dependencies"].items()
    }
    assert declared == {extra: {dist for _, dist in pkgs} for extra, pkgs in EXTRAS.items()}
    runtime = {Requirement(r).name for r in project["dependencies"]}
    assert not runtime & set().union(*declared.values()), "an extra's package is a main one too"


@pytest.mark.parametrize(
    ("command", "extra"),
    [
        ("train", "train"),
        ("evaluate", "train"),
        ("calibrate", "train"),
        ("bundle combine", "train"),
        ("data ood-sets", "ood-sets"),
        ("bench", "bench"),
        ("bench-gpu", "bench"),
    ],
)
def test_a_command_without_its_extra_says_what_to_install(command: str, extra: str) -> None:
    result = emoworker_blocked(
        *command.split(), *(["x", "y"] if command == "bundle combine" else [])
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"error: emoworker {command} needs the {extra} extra")
    assert result.stderr.rstrip().endswith(f"pip install 'emotion-stream[{extra}]'")


def test_the_demo_without_its_extra_says_what_to_install() -> None:
    result = blocked_python("import runpy\nrunpy.run_module('worker.demo', run_name='__main__')")
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        "error: make demo needs the demo extra (psutil not installed): "
        "pip install 'emotion-stream[demo]'\n"
    )


def test_the_runtime_works_without_the_extras(tmp_path: Path) -> None:
    imported = blocked_python("import worker.pipeline, worker.file_mode, worker.kafka.replay")
    assert imported.returncode == 0, imported.stderr

    helped = emoworker_blocked("--help")
    assert helped.returncode == 0, helped.stderr
    assert " run " in helped.stdout and " classify " in helped.stdout

    (tmp_path / "posts.jsonl").write_text(
        '{"id": "a", "text": "Thank you so much, this made my day!"}\n'
        '{"id": "b", "text": "I miss her so much"}\nnot json\n',
        encoding="utf-8",
    )
    args = ["classify", "-i", "posts.jsonl", "-o", "out.jsonl", "--dead-letter", "dead.jsonl"]
    # the bundled default model: a LoRA bundle, loaded through peft as `emoworker run` does
    classified = emoworker_blocked(*args, "--model", "default", "--n-samples", "2", cwd=tmp_path)
    assert classified.returncode == 0, classified.stderr
    assert "3 lines: 2 enriched" in classified.stderr
    assert len((tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()) == 2


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def runtime_modules() -> list[Path]:
    """Every module under worker/ but the tooling packages and cli/ (whose tooling commands
    import it lazily, after checking the extra)."""
    tooling_dirs = [WORKER / name.split(".")[1] for name in TOOLING]
    return [
        path
        for path in sorted(WORKER.rglob("*.py"))
        if WORKER / "cli" not in path.parents and not any(d in path.parents for d in tooling_dirs)
    ]


def test_no_import_runs_upward() -> None:
    """The runtime (worker/inference/ above all) imports nothing from the tooling."""
    modules = runtime_modules()
    assert WORKER / "inference" / "adapters.py" in modules
    upward = {
        str(path.relative_to(REPO)): sorted(
            name
            for name in imported_modules(path)
            if any(name == t or name.startswith(t + ".") for t in TOOLING)
        )
        for path in modules
    }
    assert {path: names for path, names in upward.items() if names} == {}


def test_the_resolver_runs_without_the_inference_stack() -> None:
    """``emoworker resolve`` loads no model: importing its service, the command line included,
    leaves torch and transformers out of the process (its pods are sized without them)."""
    code = (
        "import worker.cli, worker.resolve.service\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = blocked_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
