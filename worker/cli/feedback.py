"""The feedback loop's commands: release models to the workers (rollouts), learn from the
reviewers' verdicts, simulate the loop."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from worker.cli.common import (
    FETCHED,
    BootstrapOpt,
    CliError,
    app,
    err,
    load_settings,
    one_line_errors,
    require_extra,
    rollout_app,
)

CanaryOpt = Annotated[
    Path | None,
    typer.Option(
        help="Held-out labelled posts (GoEmotions .tsv) the gate scores both models on; never "
        "train on them."
    ),
]
ToleranceOpt = Annotated[
    float, typer.Option(help="How much lower the candidate's canary macro-F1 may be.")
]


@rollout_app.command("promote")
@one_line_errors
def rollout_promote(
    model: Annotated[str, typer.Argument(help="The bundle folder, as every worker sees it.")],
    canary: CanaryOpt = None,
    tolerance: ToleranceOpt = 0.0,
    note: Annotated[str | None, typer.Option(help="Why, for the release history.")] = None,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Announce a bundle to every running worker; with --canary, only if it scores at least as
    well as the model in use."""
    from worker.feedback.rollout import promote
    from worker.inference.loading import load_classifier

    settings = load_settings({"kafka.bootstrap_servers": bootstrap_servers})
    if canary is not None:
        require_extra("train", "emoworker rollout promote --canary")
        from worker.training.learn import gate_against_current

        result = gate_against_current(settings, model, canary, tolerance)
        err.print(result.line())
        if not result.passed:
            raise CliError(f"not promoted: {result.line()}")
        revision = result.candidate_revision  # loaded once, by the gate
    else:
        revision = load_classifier(settings.model.model_copy(update={"path": model})).revision
    rollout = asyncio.run(promote(settings, model, revision, note=note))
    err.print(f"version {rollout.current.version}: {model} (revision {revision}) announced")


@rollout_app.command("rollback")
@one_line_errors
def rollout_rollback(
    note: Annotated[str | None, typer.Option(help="Why, for the release history.")] = None,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Make the release before the current one current again."""
    from worker.feedback.rollout import rollback

    settings = load_settings({"kafka.bootstrap_servers": bootstrap_servers})
    try:
        rollout = asyncio.run(rollback(settings, note))
    except LookupError as exc:
        raise CliError(str(exc)) from exc
    c = rollout.current
    err.print(f"version {c.version}: back to {c.model_path} (revision {c.revision})")


@rollout_app.command("status")
@one_line_errors
def rollout_status(
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """The current release and the ones before it."""
    from worker.feedback.rollout import read_rollout

    settings = load_settings({"kafka.bootstrap_servers": bootstrap_servers})
    rollout, _ = asyncio.run(read_rollout(settings.kafka, settings.topics.control))
    if rollout is None:
        err.print(f"no release announced: workers run {settings.model.path}")
        return
    from rich.table import Table

    table = Table("version", "reason", "model", "revision", "thresholds", "announced")
    for r in [rollout.current, *rollout.previous]:
        table.add_row(
            str(r.version), r.reason, r.model_path, r.revision or "-",
            str(len(r.thresholds or {})), f"{r.announced_at:%Y-%m-%d %H:%M} {r.announced_by}",
        )  # fmt: skip
    Console().print(table)


@app.command()
@one_line_errors
def learn(
    canary: CanaryOpt = None,
    thresholds_only: Annotated[
        bool,
        typer.Option(
            help="Only recalibrate the model in use's thresholds from the verdicts (cheap)."
        ),
    ] = False,
    data: Annotated[
        Path | None,
        typer.Option(help=f"Folder with train.tsv, dev.tsv, labels.txt; default: {FETCHED}."),
    ] = None,
    output: Annotated[
        Path, typer.Option(help="Folder for the candidate bundle and its data.")
    ] = Path("runs/learn"),
    epochs: Annotated[float, typer.Option(help="Training epochs.")] = 4.0,
    max_steps: Annotated[int, typer.Option(help="Smoke runs: stop after this many steps.")] = 0,
    promote_it: Annotated[
        bool, typer.Option("--promote", help="Announce the result if it passes the gate.")
    ] = False,
    tolerance: ToleranceOpt = 0.0,
    every: Annotated[
        float, typer.Option(help="With --thresholds-only: repeat every this many seconds.")
    ] = 0.0,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Learn from the reviewers' verdicts (the final topic): recalibrate the thresholds, or
    fine-tune on train + verdicts, gate the new bundle on a canary set and promote it."""
    settings = load_settings({"kafka.bootstrap_servers": bootstrap_servers})
    while thresholds_only:
        from worker.feedback.recalibration_job import recalibrate_thresholds

        job = asyncio.run(recalibrate_thresholds(settings, announce=promote_it))
        for name, (old, new) in job.result.changed.items():
            print(f"{name}: {old:.3f} -> {new:.3f}")
        err.print(
            f"{job.reviewed_posts} reviewed posts, {job.verdicts} verdicts on this model "
            f"({job.model_path}): {len(job.result.changed)} labels moved from the bundle's"
        )
        if job.announced is not None:
            err.print(f"version {job.announced.current.version}: thresholds announced")
        if not every:
            return
        time.sleep(every)
    require_extra("train", "emoworker learn")
    if canary is None:
        raise CliError("--canary is required to gate a fine-tuned bundle")
    from worker.datasets import default_data_dir, missing_data_message
    from worker.training.learn import learn as learn_from_verdicts
    from worker.training.train import TrainConfig

    folder = data if data is not None else default_data_dir()
    if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
        raise CliError(missing_data_message(folder))
    config = TrainConfig(epochs=epochs, max_steps=max_steps)
    result, announced = learn_from_verdicts(
        settings, folder, canary, output, config, tolerance, promote_it, log=err.print
    )
    if not result.passed:
        raise CliError(f"not promoted: {result.line()}")
    if announced is not None:
        err.print(f"version {announced.current.version}: {announced.current.model_path} announced")


@app.command("simulate-feedback")
@one_line_errors
def simulate_feedback(
    data: Annotated[
        Path | None,
        typer.Option(
            help=f"Folder with train.tsv and dev.tsv (GoEmotions format); default: {FETCHED}."
        ),
    ] = None,
    output: Annotated[Path, typer.Option(help="Folder for the JSON, table and plot.")] = Path(
        "runs/feedback-simulation"
    ),
    rounds: Annotated[int, typer.Option(help="Chunks the unlabelled posts stream in.")] = 10,
    seeds: Annotated[str, typer.Option(help="Seeds, comma-separated (one run each).")] = "0,1,2",
    budget: Annotated[float, typer.Option(help="Share of each chunk sent to review.")] = 0.05,
    initial_share: Annotated[float, typer.Option(help="Share of train labelled at start.")] = 0.2,
    base_model: Annotated[
        str | None, typer.Option(help="Frozen encoder (default: the packaged MiniLM-L6 base).")
    ] = None,
) -> None:
    """The feedback loop on GoEmotions: routing by the product's score, by mutual information and
    at random, the reviewers answering with the gold labels; dev macro-F1 by verdicts."""
    require_extra("train", "emoworker simulate-feedback")
    from worker.datasets import default_data_dir, missing_data_message
    from worker.training.feedback_sim import SimConfig, simulate, write_report
    from worker.training.goemotions import load_dataset_dir
    from worker.training.train import default_base_model

    folder = data if data is not None else default_data_dir()
    if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
        raise CliError(missing_data_message(folder))
    names, train_split, dev_split = load_dataset_dir(folder)
    config = SimConfig(
        initial_share=initial_share,
        budget=budget,
        rounds=rounds,
        seeds=[int(s) for s in seeds.split(",") if s.strip()],
    )
    result = simulate(
        train_split,
        dev_split,
        names,
        base_model or default_base_model(),
        output / "cache",
        config,
        progress=err.print,
    )
    for path in write_report(result, output):
        err.print(f"wrote {path}")
    for key, row in result["summary"].items():
        err.print(f"{key}: {json.dumps(row)}")
