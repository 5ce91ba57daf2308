"""Model tooling: train, evaluate and calibrate a model, combine bundles, fetch the data sets.
Each command imports its tooling package only when it runs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, cast

import typer

from worker.cli.common import (
    FETCHED,
    AdapterOpt,
    CliError,
    ModelOpt,
    ModelOptions,
    ModeOpt,
    PrecisionOpt,
    RemoteCodeOpt,
    SamplesOpt,
    app,
    bundle_app,
    data_app,
    err,
    load_settings,
    model_folder,
    one_line_errors,
    require_extra,
)


@app.command()
@one_line_errors
def train(
    data: Annotated[
        Path | None,
        typer.Option(
            help="Folder with train.tsv, dev.tsv (GoEmotions format), labels.txt; default: "
            f"{FETCHED}."
        ),
    ] = None,
    output: Annotated[Path, typer.Option(help="Bundle folder to write.")] = Path("runs/bundle"),
    base: Annotated[
        str | None, typer.Option(help="Base encoder: folder or hub id (default: MiniLM-L6).")
    ] = None,
    epochs: Annotated[
        float, typer.Option(help="Training epochs (early stopping may end sooner).")
    ] = 4.0,
    learning_rate: Annotated[
        float, typer.Option(help="Learning rate (LoRA adapters or, with --lora-rank 0, weights).")
    ] = 5e-4,
    head_learning_rate: Annotated[
        float, typer.Option(help="Classifier head learning rate.")
    ] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Posts per optimiser step.")] = 32,
    pos_weight: Annotated[str, typer.Option(help="Class balance: log, sqrt or none.")] = "log",
    lora_rank: Annotated[
        int, typer.Option(help="LoRA rank; 0 fine-tunes every weight (use ~8e-5 then).")
    ] = 32,
    weights: Annotated[
        str, typer.Option(help="Bundle weights: lora (needs --lora-rank), delta or full.")
    ] = "lora",
    freeze_embeddings: Annotated[bool, typer.Option(help="Keep word embeddings fixed.")] = True,
    ema_decay: Annotated[float, typer.Option(help="Weight averaging; 0 disables.")] = 0.0,
    eval_every: Annotated[
        int, typer.Option(help="Steps between dev evaluations; 0: two per epoch.")
    ] = 0,
    patience: Annotated[int, typer.Option(help="Evaluations without gain before stopping.")] = 4,
    n_samples: Annotated[int, typer.Option(help="MC samples for threshold calibration.")] = 30,
    max_train_posts: Annotated[
        int, typer.Option(help="Use only this many posts (smoke runs).")
    ] = 0,
    max_steps: Annotated[int, typer.Option(help="Stop after this many steps (smoke runs).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed for reproducible training.")] = 13,
    threads: Annotated[int, typer.Option(help="CPU threads; 0: torch's default.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    precision: Annotated[
        str, typer.Option(help="fp32, or bf16 (autocast; fast on CPUs with AMX and on GPUs).")
    ] = "fp32",
) -> None:
    """Fine-tune an encoder on GoEmotions-format data and write a model bundle.

    The run saves a checkpoint in OUTPUT/checkpoint at every dev evaluation: the same command
    started again continues from there."""
    require_extra("train", "emoworker train")
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    from worker.datasets import default_data_dir, missing_data_message
    from worker.training.export import WeightsKind
    from worker.training.run import run_training
    from worker.training.train import TrainConfig, default_base_model

    if weights not in ("delta", "lora", "full"):
        raise CliError("--weights must be delta, lora or full")
    if precision not in ("fp32", "bf16"):
        raise CliError("--precision must be fp32 or bf16")
    folder = data if data is not None else default_data_dir()
    if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
        raise CliError(
            missing_data_message(folder)
            if data is None
            else f"{data} must hold train.tsv and dev.tsv (GoEmotions TSV format)"
        )
    config = TrainConfig(
        base_model=base or default_base_model(),
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        head_learning_rate=head_learning_rate,
        pos_weight=pos_weight,
        lora_rank=lora_rank,
        freeze_embeddings=freeze_embeddings,
        ema_decay=ema_decay,
        eval_every=eval_every,
        patience=patience,
        max_train_posts=max_train_posts,
        max_steps=max_steps,
        seed=seed,
        threads=threads,
        device=device,
        precision=precision,
    )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        "{task.completed}/{task.total} steps",
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as bar:
        task = bar.add_task("training", total=None)

        def progress(step: int, total: int) -> None:
            bar.update(task, completed=step, total=total)

        kind = cast(WeightsKind, weights)  # checked above
        metrics = run_training(
            folder, output, config, kind, n_samples, log=bar.console.print, progress=progress
        )
    err.print(
        f"bundle written to {output} ({metrics['bundle_bytes'] / 1e6:.1f} MB): dev macro-F1 "
        f"{metrics['mc_macro_f1_at_0.5']:.4f} at 0.5, {metrics['mc_macro_f1_split_half']:.4f} "
        "with thresholds tuned on the other half of dev"
    )


@app.command()
@one_line_errors
def evaluate(
    data: Annotated[
        Path | None,
        typer.Option(
            help=f"Labelled posts: a GoEmotions-format .tsv file; default: dev.tsv of {FETCHED}."
        ),
    ] = None,
    model: ModelOpt = None,
    n_samples: SamplesOpt = None,
    mc_mode: ModeOpt = None,
    precision: PrecisionOpt = None,
    seed: Annotated[int, typer.Option(help="Seed of the MC samples.")] = 0,
    labels: Annotated[
        Path | None, typer.Option(help="labels.txt (id to name); default: the model's labels.")
    ] = None,
    output_dir: Annotated[Path, typer.Option(help="Where reports and plots go.")] = Path(
        "runs/evaluation"
    ),
    limit: Annotated[int, typer.Option(help="Evaluate only the first N posts; 0: all.")] = 0,
    ood: Annotated[
        list[Path] | None,
        typer.Option(
            help="Out-of-distribution posts: a file (one post per line, or JSON lines with text "
            "and lang) or a folder of them (emoworker data ood-sets), repeatable: adds AUROC and "
            "false-alarm rate per OOD signal and set against DATA's posts."
        ),
    ] = None,
    adapter: AdapterOpt = None,
    trust_remote_code: RemoteCodeOpt = None,
) -> None:
    """Score a model on labelled data with MC Dropout: metrics, routing curves, plots; with
    --ood, how well the out-of-distribution signals find posts unlike DATA's."""
    require_extra("train", "emoworker evaluate")
    from rich.progress import Progress

    from worker.datasets import default_data_dir, missing_data_message
    from worker.training.evaluate import load_evaluation, run_evaluation

    if data is None:
        data = default_data_dir() / "dev.tsv"
        if not data.is_file():
            raise CliError(missing_data_message(data))
    settings = load_settings(
        model=ModelOptions(model, n_samples, mc_mode, precision, adapter, trust_remote_code)
    )
    classifier, split = load_evaluation(settings.model, data, labels, limit)
    ood_files: list[Path] = []
    for path in ood or []:
        if path.is_dir():
            ood_files += sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl"))
        elif path.is_file():
            ood_files.append(path)
        else:
            raise CliError(f"OOD file or folder {path} does not exist")
    with Progress(console=err, transient=True) as bar:
        total = len(split) * 2 + sum(len(p.read_text().splitlines()) for p in ood_files)
        task = bar.add_task(f"MC Dropout, N = {settings.model.n_samples}", total=total)
        markdown = run_evaluation(
            classifier,
            split,
            data,
            output_dir,
            settings.model,
            seed=seed,
            progress=lambda k: bar.advance(task, k),
            ood_files=ood_files,
            settings=settings,
        )
    sys.stdout.write(markdown)
    err.print(f"reports and plots in {output_dir}")


@app.command()
@one_line_errors
def calibrate(
    data: Annotated[
        Path | None,
        typer.Option(
            help=f"Folder with train.tsv and dev.tsv (GoEmotions format); default: {FETCHED}."
        ),
    ] = None,
    model: ModelOpt = None,
    n_samples: SamplesOpt = None,
    mc_mode: ModeOpt = None,
    precision: PrecisionOpt = None,
    languages: Annotated[
        str, typer.Option(help="Languages the model reads (ISO 639-1), comma-separated.")
    ] = "en",
    false_alarm_rate: Annotated[
        float, typer.Option(help="Share of in-distribution (dev) posts the OOD cut may flag.")
    ] = 0.01,
    output: Annotated[
        Path | None, typer.Option(help="Folder to write the files into; default: the model's.")
    ] = None,
    tune_thresholds: Annotated[
        bool,
        typer.Option(
            help="Also tune the per-label thresholds again on the same dev MC means (shrunk "
            "toward one shared threshold) and write thresholds.json and the bundle's dev figures."
        ),
    ] = False,
) -> None:
    """Fit what a model learns from dev beyond its thresholds and store it beside its weights:
    the out-of-distribution signals (ood.json: density on train, references and cut on dev) and
    the routing (calibration.json, and selector.json when the learned score measures better);
    with --tune-thresholds, the thresholds first."""
    require_extra("train", "emoworker calibrate")
    from rich.progress import Progress

    from worker.datasets import default_data_dir, missing_data_message
    from worker.inference.engine import EngineConfig
    from worker.inference.loading import load_classifier
    from worker.training.calibrate import fit_calibration, write_fitted, write_tuned_thresholds
    from worker.training.evaluation import calibration_report, predict_texts
    from worker.training.goemotions import load_dataset_dir
    from worker.training.ood_fit import middle_layer

    folder = data if data is not None else default_data_dir()
    if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
        raise CliError(missing_data_message(folder))
    settings = load_settings(model=ModelOptions(model, n_samples, mc_mode, precision))
    target = output or model_folder(settings.model.path)
    classifier = load_classifier(settings.model)
    target.mkdir(parents=True, exist_ok=True)
    _, train_split, dev_split = load_dataset_dir(folder)
    m = settings.model
    engine = EngineConfig(
        n_samples=m.n_samples,
        mode=m.mc_mode,
        seed=0,
        precision=m.precision,
        feature_layer=middle_layer(classifier),
    )
    dev_passes = 2 if tune_thresholds else 1
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task(
            "calibrating", total=(dev_passes + 1) * len(dev_split) + len(train_split)
        )

        def step(k: int) -> None:
            bar.advance(task, k)

        mc = predict_texts(classifier, dev_split.texts, engine_config=engine, progress=step)
        report = calibration_report(dev_split.targets, mc.mean) if tune_thresholds else None
        if report is not None:
            # the routing is fitted around the new thresholds: the flip rates (a feature of the
            # learned score) count samples against them, so the same seeded pass runs again
            classifier.thresholds = report["thresholds"]
            mc = predict_texts(classifier, dev_split.texts, engine_config=engine, progress=step)
        ood, routing = fit_calibration(
            classifier,
            train_split,
            dev_split,
            mc,
            engine,
            languages=tuple(c.strip() for c in languages.split(",") if c.strip()),
            false_alarm_rate=false_alarm_rate,
            progress=step,
        )
    write_fitted(target, ood, routing, classifier.label_names)
    if report is not None and not write_tuned_thresholds(
        target, classifier.label_names, report, routing.measured
    ):
        err.print(f"{target} is no bundle: its dev figures were not written (thresholds.json was)")
    r = routing.measured
    err.print(
        f"written to {target}: OOD signals {', '.join(ood.signals)}, cut {ood.cut:.3f} "
        f"({100 * ood.measured['false_alarm_rate_split_half']:.2f} % of the dev half the cut was "
        f"not chosen on flagged); expected-risk AURC {r['expected_risk']['aurc']:.4f} -> "
        f"{r['expected_risk_calibrated']['aurc']:.4f} calibrated; learned score "
        f"{'shipped' if routing.selector else 'not shipped'} (AURC {r['learned']['aurc']:.4f})"
    )


@bundle_app.command("combine")
@one_line_errors
def bundle_combine(
    members: Annotated[list[Path], typer.Argument(help="Bundles trained apart (two or more).")],
    output: Annotated[Path, typer.Option(help="Ensemble bundle folder to write.")] = Path(
        "runs/ensemble"
    ),
    data: Annotated[
        Path | None,
        typer.Option(help=f"Folder with train.tsv and dev.tsv; default: {FETCHED}."),
    ] = None,
    n_samples: Annotated[
        int, typer.Option(help="MC samples per post in all, split evenly over the members.")
    ] = 30,
) -> None:
    """An ensemble bundle: the members' weights side by side, thresholds and the OOD calibration
    from the ensemble's MC means on dev."""
    require_extra("train", "emoworker bundle combine")
    from worker.datasets import default_data_dir, missing_data_message
    from worker.training.ensemble import combine_bundles

    folder = data if data is not None else default_data_dir()
    if not (folder / "train.tsv").is_file() or not (folder / "dev.tsv").is_file():
        raise CliError(missing_data_message(folder))
    if output.resolve() in {m.resolve() for m in members}:
        raise CliError("--output must not be one of the members")
    metrics = combine_bundles(members, output, folder, n_samples, log=err.print)
    err.print(
        f"ensemble of {len(members)} written to {output} ({metrics['bundle_bytes'] / 1e6:.1f} MB):"
        f" dev macro-F1 {metrics['mc_macro_f1_split_half']:.4f} with thresholds tuned on the "
        "other half of dev"
    )


@data_app.command("ood-sets")
@one_line_errors
def data_ood_sets(
    output: Annotated[Path, typer.Option(help="Folder for the sets (one .txt per set).")] = Path(
        "runs/ood-sets"
    ),
    posts: Annotated[int, typer.Option(help="Posts per set.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the generators.")] = 0,
    in_distribution: Annotated[
        Path | None,
        typer.Option(
            help="GoEmotions-format TSV whose posts the shuffled set reorders; default: the "
            f"dev.tsv of {FETCHED} (the set is left out when there is none)."
        ),
    ] = None,
) -> None:
    """Generate out-of-distribution evaluation sets: other languages and scripts, code, log
    lines, links and hashtags, package documentation, shuffled posts (for evaluate --ood)."""
    require_extra("ood-sets", "emoworker data ood-sets")
    from worker.datasets import default_data_dir
    from worker.training.ood_sets import make_ood_sets

    source = in_distribution or default_data_dir() / "dev.tsv"
    texts: list[str] = []
    if source.is_file():
        texts = [line.split("\t", 1)[0] for line in source.read_text("utf-8").splitlines()]
    elif in_distribution is not None:
        raise CliError(f"{in_distribution} does not exist")
    written = make_ood_sets(output, texts, posts, seed)
    err.print(f"{len(written)} sets of up to {posts} posts in {output}: {', '.join(written)}")


@data_app.command("fetch")
@one_line_errors
def data_fetch(
    name: Annotated[str, typer.Argument(help="The data set: goemotions.")],
    folder: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            help="Where the files go; default: $EMOWORKER_GOEMOTIONS_DIR, else goemotions/ in "
            "$EMOWORKER_CACHE_DIR, $XDG_CACHE_HOME/emotion-stream or ~/.cache/emotion-stream.",
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from", help="Copy the files from this local folder instead (same sha256 checks)."
        ),
    ] = None,
    include_test: Annotated[
        bool,
        typer.Option(
            "--include-test",
            help="Also the test split (held out for independent evaluation; no pinned sha256).",
        ),
    ] = False,
) -> None:
    """Download a data set's official files (pinned URLs and sha256) into the cache folder."""
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TaskID,
        TransferSpeedColumn,
    )

    from worker.datasets import DATASETS, DataFetchError, default_data_dir, fetch_dataset
    from worker.logs import configure_logging

    if name not in DATASETS:
        raise CliError(f"unknown data set {name!r}: choose from {', '.join(DATASETS)}")
    configure_logging("auto", "WARNING")
    target = folder if folder is not None else default_data_dir()
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(file: str, done: int, total: int | None) -> None:
            if file not in tasks:
                tasks[file] = bar.add_task(file, total=total)
            bar.update(tasks[file], completed=done)

        try:
            fetched = fetch_dataset(
                DATASETS[name],
                target,
                source_dir=source,
                include_optional=include_test,
                progress=progress,
            )
        except DataFetchError as exc:
            raise CliError(escape(str(exc))) from exc
    for f in fetched:
        check = "sha256 ok" if f.verified else f"no pinned sha256, got {f.sha256}"
        err.print(f"{f.name}: {f.action} ({f.size:,} bytes, {check})")
    err.print(f"{name} ready in {escape(str(target))}")
