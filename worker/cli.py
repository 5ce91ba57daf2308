"""``emoworker``: the command line of emotion-stream."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

import typer
from pydantic import ValidationError
from rich.console import Console

from worker.exit_codes import EXIT_CONFIG

if TYPE_CHECKING:
    from worker.settings import WorkerSettings

app = typer.Typer(
    name="emoworker",
    help="Classify social posts from Kafka into emotions with MC Dropout uncertainty.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
topics_app = typer.Typer(help="Create or describe the worker's topics.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
data_app = typer.Typer(
    help="Fetch the data sets that train, evaluate and bench read.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
bundle_app = typer.Typer(help="Build model bundles from trained ones.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")
rollout_app = typer.Typer(
    help="Release models to the running workers (the control topic).", no_args_is_help=True
)
app.add_typer(rollout_app, name="rollout")
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


class CliError(Exception):
    """An error the user can fix; printed as one line."""


def one_line_errors(fn: F) -> F:
    """Turn known failures into one clear line on stderr and exit code 1 (EXIT_CONFIG)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from worker.inference.loading import ModelLoadError

        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            env = "EMOWORKER_" + "__".join(str(p).upper() for p in first["loc"])
            err.print(f"[red]error:[/] invalid setting {where} ({env}): {first['msg']}")
        except (CliError, ModelLoadError, FileNotFoundError, ValueError) as exc:
            err.print(f"[red]error:[/] {exc}")
        raise typer.Exit(EXIT_CONFIG)

    return wrapper  # type: ignore[return-value]


def require_extra(extra: str, command: str) -> None:
    """Stop with one line naming what to install when the tooling's ``extra`` is missing."""
    from rich.markup import escape

    from worker.extras import missing_extra

    message = missing_extra(extra, command)
    if message is not None:
        raise CliError(escape(message))


@dataclass(frozen=True)
class ModelOptions:
    """The model options a command was given (None: not given, the setting stands)."""

    path: str | None = None
    n_samples: int | None = None
    mc_mode: str | None = None
    precision: str | None = None
    adapter: str | None = None
    trust_remote_code: bool | None = None
    seed: int | None = None

    def overrides(self) -> dict[str, Any]:
        return {f"model.{name}": value for name, value in asdict(self).items()}


def load_settings(
    overrides: Mapping[str, Any] | None = None, model: ModelOptions | None = None
) -> WorkerSettings:
    """The settings (environment, .env) with the command's options over them: ``overrides`` by
    dotted path (``kafka.bootstrap_servers``), ``model`` for the model options; a None value
    leaves the setting as it is. The result is validated again."""
    from worker.settings import WorkerSettings

    settings = WorkerSettings()
    merged = {**(model.overrides() if model is not None else {}), **(overrides or {})}
    for dotted, value in merged.items():
        if value is None:
            continue
        target: Any = settings
        parts = dotted.split(".")
        for part in parts[:-1]:
            target = getattr(target, part)
        setattr(target, parts[-1], value)
    return type(settings).model_validate(settings.model_dump())


ModelOpt = Annotated[
    str | None, typer.Option("--model", help="Model: 'default', a folder or a hub id.")
]
SamplesOpt = Annotated[int | None, typer.Option("--n-samples", help="MC Dropout samples.")]
ModeOpt = Annotated[str | None, typer.Option("--mc-mode", help="full, fast or off.")]
PrecisionOpt = Annotated[
    str | None, typer.Option("--precision", help="auto, fp32, bf16 or fp16 (matmul precision).")
]
AdapterOpt = Annotated[
    str | None, typer.Option("--adapter", help="Output adapter (see the README), e.g. tuple:1.")
]
RemoteCodeOpt = Annotated[
    bool | None,
    typer.Option("--trust-remote-code", help="Allow the checkpoint's own Python code to run."),
]
BootstrapOpt = Annotated[
    str | None, typer.Option(help="Kafka bootstrap servers (overrides the settings).")
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Seed the MC samples.")]
FETCHED = "the folder `emoworker data fetch goemotions` fills"  # the --data defaults


@app.command()
@one_line_errors
def run(
    bootstrap_servers: BootstrapOpt = None,
    model: ModelOpt = None,
    n_samples: SamplesOpt = None,
    mc_mode: ModeOpt = None,
    precision: PrecisionOpt = None,
    adapter: AdapterOpt = None,
    trust_remote_code: RemoteCodeOpt = None,
) -> None:
    """Run the streaming worker (configured by EMOWORKER_* variables and .env)."""
    from worker.logs import configure_logging
    from worker.pipeline import Pipeline

    settings = load_settings(
        {"kafka.bootstrap_servers": bootstrap_servers},
        ModelOptions(model, n_samples, mc_mode, precision, adapter, trust_remote_code),
    )
    configure_logging(settings.log_format, settings.log_level)
    code = asyncio.run(Pipeline(settings).run())
    raise typer.Exit(code)


@app.command()
@one_line_errors
def resolve(
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Join reviewers' verdicts with their review requests: publish posts.final exactly once."""
    from worker.logs import configure_logging
    from worker.resolve.service import Resolver

    settings = load_settings({"kafka.bootstrap_servers": bootstrap_servers})
    configure_logging(settings.log_format, settings.log_level)
    raise typer.Exit(asyncio.run(Resolver(settings).run()))


@app.command()
@one_line_errors
def classify(
    input: Annotated[str, typer.Option("--input", "-i", help="JSON lines of posts; - for stdin.")],
    output: Annotated[
        str, typer.Option("--output", "-o", help="Enriched events (JSON lines); - for stdout.")
    ] = "-",
    dead_letter: Annotated[
        str | None,
        typer.Option("--dead-letter", help="Dead letters (JSON lines); default: stderr."),
    ] = None,
    review: Annotated[
        str | None, typer.Option("--review", help="Review requests (JSON lines).")
    ] = None,
    unsupported: Annotated[
        str | None,
        typer.Option(
            "--unsupported",
            help="Events of posts flagged out of distribution when ood.action is topic "
            "(JSON lines).",
        ),
    ] = None,
    model: ModelOpt = None,
    n_samples: SamplesOpt = None,
    mc_mode: ModeOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Posts per inference batch.")] = None,
    adapter: AdapterOpt = None,
    trust_remote_code: RemoteCodeOpt = None,
) -> None:
    """Classify a file of posts: the worker's pipeline without Kafka."""
    from contextlib import ExitStack

    from rich.progress import Progress

    from worker.decoding import DecodeLimits
    from worker.file_mode import classify_stream
    from worker.inference.loading import load_classifier
    from worker.logs import configure_logging
    from worker.processing import BatchProcessor

    settings = load_settings(
        {"batch_size": batch_size},
        ModelOptions(model, n_samples, mc_mode, precision, adapter, trust_remote_code, seed),
    )
    configure_logging(settings.log_format, "WARNING")
    if input != "-" and not Path(input).is_file():
        raise CliError(f"input file {input} does not exist")
    with ExitStack() as stack:
        src = sys.stdin.buffer if input == "-" else stack.enter_context(open(input, "rb"))
        out = sys.stdout.buffer if output == "-" else stack.enter_context(open(output, "wb"))
        dlq = (
            sys.stderr.buffer
            if dead_letter is None
            else stack.enter_context(open(dead_letter, "wb"))
        )
        rev = None if review is None else stack.enter_context(open(review, "wb"))
        odd = None if unsupported is None else stack.enter_context(open(unsupported, "wb"))
        classifier = load_classifier(settings.model)
        processor = BatchProcessor(classifier, settings)
        total = None
        if input != "-":
            with open(input, "rb") as f:
                total = sum(1 for _ in f)
        with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
            task = progress.add_task("classifying", total=total)
            stats = classify_stream(
                src,
                input,
                processor,
                DecodeLimits.of(settings),
                out.write,
                dlq.write,
                None if rev is None else rev.write,
                None if odd is None else odd.write,
                batch_size=settings.batch_size,
                on_progress=lambda n: progress.advance(task, n),
            )
    err.print(
        f"{stats.lines} lines: {stats.enriched} enriched, {stats.reviewed} to review, "
        f"{stats.dead_lettered} dead-lettered"
        + (f" {stats.dead_letter_kinds}" if stats.dead_letter_kinds else "")
        + (f"; out of distribution: {stats.ood}" if stats.ood else "")
    )


@app.command()
@one_line_errors
def schema(
    name: Annotated[
        str | None,
        typer.Argument(
            help="social_post, enriched_post, review_request, dead_letter, review_verdict or "
            "final_post."
        ),
    ] = None,
    write: Annotated[bool, typer.Option(help="Write the files under schemas/.")] = False,
) -> None:
    """Print the JSON Schemas of the events (or write them)."""
    import schemas

    if write:
        for path in schemas.write_json_schemas():
            err.print(f"wrote {path}")
        return
    names = [name] if name else list(schemas.EVENT_MODELS)
    for n in names:
        if n not in schemas.EVENT_MODELS:
            raise CliError(f"unknown schema {n!r}: choose from {', '.join(schemas.EVENT_MODELS)}")
        sys.stdout.write(schemas.schema_text(n))


@topics_app.command("create")
@one_line_errors
def topics_create(
    partitions: Annotated[int, typer.Option(help="Partitions of the input topic.")] = 6,
    replication_factor: Annotated[int, typer.Option(help="Replicas of each topic.")] = 1,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Create the input topic and the output topics (existing ones are kept)."""
    from worker.kafka.admin import ensure_topics
    from worker.kafka.connection import output_topics

    settings = load_settings({"kafka.bootstrap_servers": bootstrap_servers})
    names = [settings.topics.input, *output_topics(settings)]
    created = asyncio.run(
        ensure_topics(
            settings.kafka,
            names,
            partitions=partitions,
            replication_factor=replication_factor,
        )
    )
    for name in names:
        err.print(f"{name}: {'created' if name in created else 'exists'}")


@topics_app.command("describe")
@one_line_errors
def topics_describe(
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Partitions, end offsets, the group's committed offsets and lag."""
    from rich.table import Table

    from worker.kafka.admin import describe_topics

    settings = load_settings({"kafka.bootstrap_servers": bootstrap_servers})
    t = settings.topics
    rows = asyncio.run(
        describe_topics(
            settings.kafka, [t.input, t.enriched, t.review, t.dead_letter], settings.group_id
        )
    )
    table = Table("topic", "partition", "end offset", "committed", "lag")
    for row in rows:
        table.add_row(*(str(x) if x is not None else "-" for x in row))
    Console().print(table)


@app.command()
@one_line_errors
def produce(
    file: Annotated[
        Path,
        typer.Argument(
            help="JSON lines of posts or verdicts (keyed by id, post_id), or a GoEmotions .tsv."
        ),
    ],
    topic: Annotated[
        str | None, typer.Option(help="Target topic (default: the input topic).")
    ] = None,
    rate: Annotated[float, typer.Option(help="Messages per second; 0: as fast as possible.")] = 0.0,
    limit: Annotated[int, typer.Option(help="Stop after this many messages; 0: all.")] = 0,
    repeat: Annotated[int, typer.Option(help="Send the file this many times.")] = 1,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Feed a topic from a file at a given rate (demos, load tests, verdicts)."""
    from worker.kafka.feed import feed_topic, read_feed

    settings = load_settings({"kafka.bootstrap_servers": bootstrap_servers})
    messages = read_feed(file)
    sent = asyncio.run(
        feed_topic(
            settings.kafka,
            topic or settings.topics.input,
            messages,
            rate=rate,
            limit=limit,
            repeat=repeat,
            progress=err if err.is_terminal else None,
        )
    )
    err.print(
        f"sent {sent.count} messages to {topic or settings.topics.input} "
        f"in {sent.seconds:.1f}s ({sent.count / max(sent.seconds, 1e-9):.0f}/s)"
    )


@app.command()
@one_line_errors
def replay(
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind", help="Replay only dead letters of this kind (repeatable); default: all."
        ),
    ] = None,
    to_topic: Annotated[
        str | None, typer.Option(help="Target topic (default: the input topic).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be replayed; publish nothing.")
    ] = False,
    limit: Annotated[int, typer.Option(help="Replay at most this many messages; 0: all.")] = 0,
    bootstrap_servers: BootstrapOpt = None,
) -> None:
    """Re-publish dead letters (original bytes and key) once the cause is fixed."""
    from typing import get_args

    from rich.table import Table

    from schemas import DeadLetterKind
    from worker.kafka.replay import ReplayError, replay_dead_letters

    known = get_args(DeadLetterKind)
    for name in kind or []:
        if name not in known:
            raise CliError(f"unknown dead-letter kind {name!r}: choose from {', '.join(known)}")
    if limit < 0:
        raise CliError("--limit must be 0 (all) or more")
    settings = load_settings({"kafka.bootstrap_servers": bootstrap_servers})
    try:
        report = asyncio.run(
            replay_dead_letters(
                settings, set(kind) if kind else None, to_topic, dry_run=dry_run, limit=limit
            )
        )
    except ReplayError as exc:
        raise CliError(str(exc)) from exc
    out = Console(soft_wrap=True)
    verb = "would replay" if report.dry_run else "replayed"
    out.print(f"read: {report.read} dead letters from {report.source_topic}")
    out.print(f"{verb}: {report.replayed} to {report.target_topic}")
    if report.dry_run:
        out.print("dry run: nothing was published")
    if report.limit_reached:
        out.print(f"stopped at --limit {limit}: later dead letters were not read")
    out.print(f"not selected: {report.not_selected}")
    out.print(f"skipped: {report.skipped_total}")
    for reason, count in sorted(report.skipped.items()):
        out.print(f"  skipped {reason}: {count}")
    if report.by_kind:
        table = Table("kind", "read", verb, "skipped", "not selected")
        for name, counts in sorted(report.by_kind.items()):
            table.add_row(
                name,
                str(counts.read),
                str(counts.replayed),
                str(counts.skipped),
                str(counts.not_selected),
            )
        out.print(table)


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
) -> None:
    """Fit what a model learns from dev beyond its thresholds and store it beside its weights:
    the out-of-distribution signals (ood.json: density on train, references and cut on dev) and
    the routing (calibration.json, and selector.json when the learned score measures better)."""
    require_extra("train", "emoworker calibrate")
    from rich.progress import Progress

    from worker.datasets import default_data_dir, missing_data_message
    from worker.inference.engine import EngineConfig
    from worker.inference.loading import load_classifier
    from worker.training.calibrate import fit_calibration, write_fitted
    from worker.training.evaluation import predict_texts
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
    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("calibrating", total=2 * len(dev_split) + len(train_split))

        def step(k: int) -> None:
            bar.advance(task, k)

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
    r = routing.measured
    err.print(
        f"written to {target}: OOD signals {', '.join(ood.signals)}, cut {ood.cut:.3f} "
        f"({100 * ood.measured['false_alarm_rate_split_half']:.2f} % of the dev half the cut was "
        f"not chosen on flagged); expected-risk AURC {r['expected_risk']['aurc']:.4f} -> "
        f"{r['expected_risk_calibrated']['aurc']:.4f} calibrated; learned score "
        f"{'shipped' if routing.selector else 'not shipped'} (AURC {r['learned']['aurc']:.4f})"
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


def model_folder(path: str) -> Path:
    """The local folder of the model ``path`` names (the default bundle's for ``default``)."""
    from worker.bundle import default_bundle_path

    folder = default_bundle_path() if path == "default" else Path(path)
    if not folder.is_dir():
        raise CliError(f"{path} is not a local model folder: give --output")
    return folder


@app.command()
@one_line_errors
def bench(
    model: Annotated[str, typer.Option(help="Model to benchmark.")] = "default",
    data: Annotated[
        Path | None,
        typer.Option(help=f"GoEmotions-format .tsv posts; default: dev.tsv of {FETCHED}."),
    ] = None,
    n_samples: Annotated[int, typer.Option(help="MC samples.")] = 30,
    fidelity_posts: Annotated[int, typer.Option(help="Posts for agreement and quality.")] = 800,
    speed_posts: Annotated[int, typer.Option(help="Posts timed for every method.")] = 256,
    streaming: Annotated[bool, typer.Option(help="Also the Kafka benchmarks.")] = True,
    quick: Annotated[bool, typer.Option(help="A few posts of everything (a check).")] = False,
    output: Annotated[Path | None, typer.Option(help="Results folder.")] = None,
) -> None:
    """Benchmark MC Dropout arrangements, the pipeline, latency and memory; write JSON."""
    require_extra("bench", "emoworker bench")
    from worker.bench.run import DEFAULT_DEV, RESULTS, BenchOptions, run_bench
    from worker.logs import configure_logging

    # as in production: per-post info lines would cost the transport bench CPU it measures
    configure_logging("auto", "WARNING")
    options = BenchOptions(
        model=model,
        data=data or DEFAULT_DEV,
        n_samples=n_samples,
        fidelity_posts=fidelity_posts,
        speed_posts=speed_posts,
        streaming=streaming,
        quick=quick,
        output=output or RESULTS,
    )
    if not options.data.is_file():
        from worker.datasets import missing_data_message

        raise CliError(
            missing_data_message(options.data)
            if data is None
            else f"benchmark posts {options.data} not found: pass --data FILE.tsv"
        )
    run_bench(options, log=err.print)


@app.command(
    "bench-gpu", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
@one_line_errors
def bench_gpu(ctx: typer.Context) -> None:
    """The inference benchmark sized for a CUDA GPU, no Kafka needed (options: --help of
    python -m worker.bench.gpu: --data, --output, --model, --device, --n-samples, --quick)."""
    require_extra("bench", "emoworker bench-gpu")
    from worker.bench.gpu import main as gpu_main

    gpu_main(list(ctx.args))


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
