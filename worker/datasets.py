"""The data sets training, evaluation and the bench read: where they live and how they get there.

``emoworker data fetch goemotions`` downloads the official GoEmotions files from pinned URLs into
a cache folder (or copies them from a local folder), checks each against its pinned sha256 and
writes it atomically (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import structlog

log = structlog.get_logger(__name__)

CHUNK = 1 << 16
DATA_DIR_ENV = "EMOWORKER_GOEMOTIONS_DIR"
GOEMOTIONS_URL = (
    "https://raw.githubusercontent.com/google-research/google-research/master/goemotions/data/"
)


@dataclass(frozen=True)
class DataFile:
    """One file of a data set: its name in the cache folder, its name at the source, its hash."""

    name: str
    source: str
    sha256: str | None  # None: no pin known (the file is kept unverified, its hash reported)
    optional: bool = False  # fetched only when asked for


@dataclass(frozen=True)
class Dataset:
    name: str
    base_url: str
    files: tuple[DataFile, ...]

    def wanted(self, include_optional: bool) -> list[DataFile]:
        return [f for f in self.files if include_optional or not f.optional]


GOEMOTIONS = Dataset(
    name="goemotions",
    base_url=GOEMOTIONS_URL,
    files=(
        DataFile(
            "train.tsv",
            "train.tsv",
            "1c254a142be5c00e80d819b9ae1bbd36d94b2eeb8f4b1271846508d57e57d9c5",
        ),
        DataFile(
            "dev.tsv", "dev.tsv", "575489c079c9de1097062a01738f998590d6b7ead66dd1c9fd1d2ba01fd8bc62"
        ),
        DataFile(
            "labels.txt",
            "emotions.txt",
            "45c3ef86782d2a4d7fedcd6d8c111aa0d0e94720689bd164fac94fefb4495a89",
        ),
        # held out for independent evaluation: never fetched unless asked for, and not pinned
        DataFile("test.tsv", "test.tsv", None, optional=True),
    ),
)
DATASETS: dict[str, Dataset] = {GOEMOTIONS.name: GOEMOTIONS}

Action = Literal["downloaded", "copied", "present"]
# (file name, bytes so far, total bytes or None): called as a file arrives
Progress = Callable[[str, int, int | None], None]


class DataFetchError(Exception):
    """A fetch that failed in a way the user can fix; the message is one line."""


@dataclass(frozen=True)
class Fetched:
    name: str
    path: Path
    action: Action
    sha256: str
    size: int
    verified: bool


def cache_root() -> Path:
    """``$EMOWORKER_CACHE_DIR``, else ``$XDG_CACHE_HOME/emotion-stream``, else
    ``~/.cache/emotion-stream``."""
    own = os.environ.get("EMOWORKER_CACHE_DIR")
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "emotion-stream"


def default_data_dir() -> Path:
    """Where ``data fetch goemotions`` writes and train, evaluate and bench read by default:
    ``$EMOWORKER_GOEMOTIONS_DIR``, else ``<cache_root>/goemotions``."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else cache_root() / "goemotions"


def missing_data_message(path: Path) -> str:
    return (
        f"GoEmotions data not found at {path}: run `emoworker data fetch goemotions` "
        "(or pass --data)"
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _atomic_target(dest: Path) -> Iterator[BinaryIO]:
    """A temporary file next to ``dest``, renamed onto it on success, removed on any failure."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.partial")
    try:
        with tmp.open("xb") as out:  # the umask's permissions, unlike mkstemp's 0600
            yield out
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_verified(
    src: BinaryIO, dest: Path, file: DataFile, origin: str, total: int | None, progress: Progress
) -> tuple[str, int]:
    """Stream ``src`` into ``dest`` atomically, checking the pinned hash before the rename."""
    digest = hashlib.sha256()
    size = 0
    with _atomic_target(dest) as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
            progress(file.name, size, total)
        got = digest.hexdigest()
        if file.sha256 is not None and got != file.sha256:
            raise DataFetchError(
                f"{origin}: sha256 {got} does not match the pinned {file.sha256} "
                f"({size:,} bytes); nothing was written to {dest}"
            )
    return got, size


def _names(files: list[DataFile]) -> str:
    return ", ".join(
        f.name if f.source == f.name else f"{f.name} (upstream {f.source})" for f in files
    )


def _by_hand(folder: Path, files: list[DataFile]) -> str:
    return f"put {_names(files)} in {folder} by hand, or use --from DIR"


def _reason(exc: OSError) -> str:
    """``Connection refused`` rather than ``<urlopen error [Errno 111] Connection refused>``."""
    inner = exc.reason if isinstance(exc, urllib.error.URLError) else exc
    return str(getattr(inner, "strerror", None) or inner)


def _local_source(folder: Path, file: DataFile) -> Path | None:
    """The file in ``folder`` under its cache name or its upstream name."""
    return next((p for p in (folder / file.name, folder / file.source) if p.is_file()), None)


def _fetch_one(
    dataset: Dataset,
    file: DataFile,
    folder: Path,
    source_dir: Path | None,
    files: list[DataFile],
    progress: Progress,
) -> Fetched:
    dest = folder / file.name
    if dest.is_file():
        present = file_sha256(dest)
        if file.sha256 is None or present == file.sha256:
            return Fetched(
                file.name, dest, "present", present, dest.stat().st_size, file.sha256 is not None
            )
        log.warning("data.replacing_mismatched_file", path=str(dest), sha256=present)
    if source_dir is not None:
        src_path = _local_source(source_dir, file)
        assert src_path is not None  # fetch_dataset checked
        with src_path.open("rb") as src:
            got, size = _copy_verified(
                src, dest, file, str(src_path), src_path.stat().st_size, progress
            )
        action: Action = "copied"
    else:
        url = dataset.base_url + file.source
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                got, size = _copy_verified(response, dest, file, url, total, progress)
        except urllib.error.HTTPError as exc:
            raise DataFetchError(
                f"downloading {url} failed: HTTP {exc.code} {exc.reason}; "
                + _by_hand(folder, files)
            ) from exc
        except OSError as exc:  # URLError included: offline, refused, timed out, reset
            raise DataFetchError(
                f"could not download {url} ({_reason(exc)}); " + _by_hand(folder, files)
            ) from exc
        action = "downloaded"
    log.info("data.fetched", file=file.name, action=action, bytes=size, sha256=got)
    return Fetched(file.name, dest, action, got, size, file.sha256 is not None)


def fetch_dataset(
    dataset: Dataset,
    folder: Path,
    *,
    source_dir: Path | None = None,
    include_optional: bool = False,
    progress: Progress | None = None,
) -> list[Fetched]:
    """Make ``folder`` hold every wanted file of ``dataset`` with its pinned hash.

    Files already there with the right hash are kept; others are downloaded from
    ``dataset.base_url`` (or copied from ``source_dir``), checked, then renamed into place.
    """
    files = dataset.wanted(include_optional)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataFetchError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    if source_dir is not None:
        if not source_dir.is_dir():
            raise DataFetchError(f"--from {source_dir} is not a folder")
        missing = [f for f in files if _local_source(source_dir, f) is None]
        if missing:
            raise DataFetchError(f"{source_dir} lacks " + _names(missing))
    report = progress or (lambda _name, _done, _total: None)
    return [_fetch_one(dataset, f, folder, source_dir, files, report) for f in files]
