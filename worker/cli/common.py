"""What every ``emoworker`` command shares: the Typer apps, one-line errors, the settings with
the command's options over them, and the common options."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from worker.exit_codes import EXIT_CONFIG, FatalError

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
    """Turn known failures into one clear line on stderr and exit code 1 (EXIT_CONFIG), or a
    fatal error's own code."""

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
        except FatalError as exc:  # e.g. a model that fails every post (exit 4)
            err.print(f"[red]error:[/] {exc}")
            raise typer.Exit(exc.exit_code) from exc
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


def model_folder(path: str) -> Path:
    """The local folder of the model ``path`` names (the default bundle's for ``default``)."""
    from worker.bundle import default_bundle_path

    folder = default_bundle_path() if path == "default" else Path(path)
    if not folder.is_dir():
        raise CliError(f"{path} is not a local model folder: give --output")
    return folder
