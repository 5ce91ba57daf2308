"""The commands the product runs with: the worker, the resolver, file mode, the event schemas,
the topics, feeding a topic and replaying dead letters."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from worker.cli.common import (
    AdapterOpt,
    BootstrapOpt,
    CliError,
    ModelOpt,
    ModelOptions,
    ModeOpt,
    PrecisionOpt,
    RemoteCodeOpt,
    SamplesOpt,
    SeedOpt,
    app,
    err,
    load_settings,
    one_line_errors,
    topics_app,
)


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
