"""The benchmarks: ``make bench`` and ``make bench-gpu``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import (
    FETCHED,
    CliError,
    app,
    err,
    one_line_errors,
    require_extra,
)


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
