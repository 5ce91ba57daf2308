"""``emoworker data fetch``: pinned downloads from a local HTTP server (never the internet), the
copy from a local folder, the cache folder's defaults, and the line train/evaluate/bench print
when the data is missing."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas.labels import GOEMOTIONS_LABELS
from worker import datasets
from worker.cli import app
from worker.datasets import (
    GOEMOTIONS,
    DataFetchError,
    DataFile,
    Dataset,
    default_data_dir,
    fetch_dataset,
)
from worker.training.goemotions import read_tsv

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "tests" / "data" / "goemotions"
TRAIN = b"i love it\t18\tid1\nso annoying\t3\tid2\n" * 300  # several chunks of the copy loop
LABELS = "\n".join(GOEMOTIONS_LABELS).encode()
EXTRA = b"held out\t27\tid9\n"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Server:
    base_url: str
    requests: list[str]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """The upstream names (``emotions.txt``, not ``labels.txt``) on 127.0.0.1, a free port."""
    root = tmp_path / "upstream"
    root.mkdir()
    (root / "train.tsv").write_bytes(TRAIN)
    (root / "emotions.txt").write_bytes(LABELS)
    (root / "extra.tsv").write_bytes(EXTRA)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(root), **kwargs)  # type: ignore[arg-type]

        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_address[1]}/", requests)
    finally:
        httpd.shutdown()
        httpd.server_close()


def fake(base_url: str, train_sha: str = sha(TRAIN)) -> Dataset:
    return Dataset(
        name="goemotions",
        base_url=base_url,
        files=(
            DataFile("train.tsv", "train.tsv", train_sha),
            DataFile("labels.txt", "emotions.txt", sha(LABELS)),
            DataFile("extra.tsv", "extra.tsv", None, optional=True),
        ),
    )


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there any more: connection refused


def test_downloads_verify_and_land_under_the_cache_names(server: Server, tmp_path: Path) -> None:
    folder = tmp_path / "cache" / "goemotions"
    seen: dict[str, tuple[int, int | None]] = {}
    fetched = fetch_dataset(
        fake(server.base_url),
        folder,
        progress=lambda name, done, total: seen.__setitem__(name, (done, total)),
    )
    assert [(f.name, f.action, f.verified) for f in fetched] == [
        ("train.tsv", "downloaded", True),
        ("labels.txt", "downloaded", True),
    ]
    assert (folder / "train.tsv").read_bytes() == TRAIN
    assert (folder / "labels.txt").read_bytes() == LABELS
    assert [f.sha256 for f in fetched] == [sha(TRAIN), sha(LABELS)]
    assert [f.size for f in fetched] == [len(TRAIN), len(LABELS)]
    assert seen["train.tsv"] == (len(TRAIN), len(TRAIN))  # Content-Length gave the total
    assert sorted(p.name for p in folder.iterdir()) == ["labels.txt", "train.tsv"]  # no temp
    assert server.requests == ["/train.tsv", "/emotions.txt"]  # the optional file stays away


def test_present_valid_files_are_not_downloaded_again(server: Server, tmp_path: Path) -> None:
    fetch_dataset(fake(server.base_url), tmp_path)
    before = (tmp_path / "train.tsv").stat().st_mtime_ns
    again = fetch_dataset(fake(server.base_url), tmp_path)
    assert [f.action for f in again] == ["present", "present"]
    assert server.requests == ["/train.tsv", "/emotions.txt"]
    assert (tmp_path / "train.tsv").stat().st_mtime_ns == before
    (tmp_path / "labels.txt").write_bytes(b"damaged")  # a wrong file there is replaced
    third = fetch_dataset(fake(server.base_url), tmp_path)
    assert [f.action for f in third] == ["present", "downloaded"]
    assert (tmp_path / "labels.txt").read_bytes() == LABELS
    assert server.requests[2:] == ["/emotions.txt"]


def test_a_corrupt_download_fails_clearly_and_leaves_no_file(
    server: Server, tmp_path: Path
) -> None:
    wrong = "0" * 64
    with pytest.raises(DataFetchError) as info:
        fetch_dataset(fake(server.base_url, train_sha=wrong), tmp_path / "d")
    message = str(info.value)
    assert f"{server.base_url}train.tsv" in message and "does not match" in message
    assert wrong in message and sha(TRAIN) in message and "\n" not in message
    assert list((tmp_path / "d").iterdir()) == []  # neither train.tsv nor a partial file


def test_an_unpinned_optional_file_comes_only_when_asked_and_reports_its_hash(
    server: Server, tmp_path: Path
) -> None:
    fetched = fetch_dataset(fake(server.base_url), tmp_path, include_optional=True)
    extra = fetched[-1]
    assert (extra.name, extra.action, extra.verified) == ("extra.tsv", "downloaded", False)
    assert extra.sha256 == sha(EXTRA) and (tmp_path / "extra.tsv").read_bytes() == EXTRA


def test_from_a_local_folder_with_the_same_checks(tmp_path: Path) -> None:
    source = tmp_path / "clone"
    source.mkdir()
    (source / "train.tsv").write_bytes(TRAIN)
    (source / "emotions.txt").write_bytes(LABELS)  # the upstream name is accepted
    dataset = fake(closed_port_url())  # the network is never used
    fetched = fetch_dataset(dataset, tmp_path / "a", source_dir=source)
    assert [f.action for f in fetched] == ["copied", "copied"]
    assert (tmp_path / "a" / "labels.txt").read_bytes() == LABELS
    (source / "train.tsv").write_bytes(TRAIN + b"x")
    with pytest.raises(DataFetchError, match="does not match"):
        fetch_dataset(dataset, tmp_path / "b", source_dir=source)
    assert list((tmp_path / "b").iterdir()) == []
    (source / "emotions.txt").unlink()  # every missing file is named before anything is copied
    with pytest.raises(DataFetchError) as info:
        fetch_dataset(dataset, tmp_path / "c", source_dir=source, include_optional=True)
    assert str(info.value) == f"{source} lacks labels.txt (upstream emotions.txt), extra.tsv"
    assert list((tmp_path / "c").iterdir()) == []


def test_the_goemotions_table() -> None:
    by_name = {f.name: f for f in GOEMOTIONS.files}
    assert [f.name for f in GOEMOTIONS.wanted(False)] == ["train.tsv", "dev.tsv", "labels.txt"]
    assert by_name["labels.txt"].source == "emotions.txt"
    assert by_name["labels.txt"].sha256 == sha(LABELS)  # the upstream file is the code's order
    assert by_name["test.tsv"].optional and by_name["test.tsv"].sha256 is None
    assert GOEMOTIONS.base_url.startswith("https://raw.githubusercontent.com/google-research/")
    assert all(len(f.sha256 or "") in (0, 64) for f in GOEMOTIONS.files)


def test_the_shipped_slices_are_the_ones_their_readme_describes() -> None:
    readme = (SHIPPED / "README.md").read_text()
    for name, rows in (("train.tsv", 80), ("dev.tsv", 500)):
        data = (SHIPPED / name).read_bytes()
        assert sha(data) in readme
        assert len(read_tsv(SHIPPED / name, len(GOEMOTIONS_LABELS))) == rows
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 100_000


def test_default_folder_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("EMOWORKER_GOEMOTIONS_DIR", "EMOWORKER_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "emotion-stream" / "goemotions"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "emotion-stream" / "goemotions"
    monkeypatch.setenv("EMOWORKER_CACHE_DIR", str(tmp_path / "own"))
    assert default_data_dir() == tmp_path / "own" / "goemotions"
    monkeypatch.setenv("EMOWORKER_GOEMOTIONS_DIR", str(tmp_path / "exact"))
    assert default_data_dir() == tmp_path / "exact"


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    # the command sets the root logger to WARNING: keep that out of this test process
    monkeypatch.setattr("worker.logs.configure_logging", lambda *_a, **_k: None)
    return CliRunner()


def test_cli_fetches_then_keeps(
    cli: CliRunner, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(datasets.DATASETS, "goemotions", fake(server.base_url))
    out = tmp_path / "out"
    args = ["data", "fetch", "goemotions", "--dir", str(out)]
    first = cli.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert f"train.tsv: downloaded ({len(TRAIN):,} bytes, sha256 ok)" in first.stderr
    assert f"goemotions ready in {out}" in first.stderr
    assert (out / "train.tsv").read_bytes() == TRAIN
    second = cli.invoke(app, args)
    assert second.exit_code == 0 and "labels.txt: present" in second.stderr
    assert len(server.requests) == 2


def test_cli_offline_is_one_line_naming_the_folder_and_files(
    cli: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = closed_port_url()
    offline = replace(GOEMOTIONS, base_url=url)
    monkeypatch.setitem(datasets.DATASETS, "goemotions", offline)
    folder = tmp_path / "goemotions"
    result = cli.invoke(app, ["data", "fetch", "goemotions", "--dir", str(folder)])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    line = result.stderr
    assert line.startswith("error: could not download " + url + "train.tsv")
    assert str(folder) in line
    for name in ("train.tsv", "dev.tsv", "labels.txt", "emotions.txt", "--from DIR"):
        assert name in line
    assert list(folder.iterdir()) == []


def test_cli_corrupt_download_is_one_line(
    cli: CliRunner, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(datasets.DATASETS, "goemotions", fake(server.base_url, "f" * 64))
    out = tmp_path / "out"
    result = cli.invoke(app, ["data", "fetch", "goemotions", "--dir", str(out)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "does not match the pinned " + "f" * 64 in result.stderr
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "missing"),
    [(["train"], ""), (["evaluate"], "dev.tsv"), (["bench", "--quick"], "dev.tsv")],
)
def test_commands_without_data_say_how_to_fetch_it(
    tmp_path: Path, command: list[str], missing: str
) -> None:
    """A user's first run: no cache folder yet, so one line pointing at ``data fetch``."""
    env = {**os.environ, "EMOWORKER_GOEMOTIONS_DIR": str(tmp_path / "none")}
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", *command],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    where = tmp_path / "none" / missing if missing else tmp_path / "none"
    assert result.stderr == (
        f"error: GoEmotions data not found at {where}: run `emoworker data fetch goemotions` "
        "(or pass --data)\n"
    )
