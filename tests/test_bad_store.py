"""A store URI that cannot work stops every CLI with ONE line naming it and exit 2: no
traceback, no minutes of MLflow's retries, and nothing created (no run, no parent, no store).

Each CLI (training, a grid sweep, a search, report, ensemble, predict, ui) meets each bad URI:
an unknown scheme, a database whose driver or server is missing, a password inside the URL,
a file that is not a database, a store in a folder that cannot be written, a tracking server
that does not answer.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from PIL import Image

from fer_sweep.sweep.store import redact
from tests.conftest import one_error_line, run_cli

pytestmark = pytest.mark.slow  # every test here starts a CLI

TRAIN = ["data=synthetic", "data.limit_per_class=5", "trainer.epochs=1", "trainer.progress=false"]
CLIS: dict[str, tuple[str, list[str]]] = {
    # name: (module, arguments); {uri} is replaced by the URI under test
    "train": ("fer_sweep", [*TRAIN, "mlflow.tracking_uri={uri}"]),
    "sweep": ("fer_sweep", ["-m", "trainer.seed=0,1", *TRAIN, "mlflow.tracking_uri={uri}"]),
    "search": (
        "fer_sweep",
        [
            "-m",
            "hparams_search=cnn2_optuna",
            "hydra.sweeper.n_trials=2",
            *TRAIN,
            "mlflow.tracking_uri={uri}",
        ],
    ),
    "report": ("fer_sweep.report", ["--tracking-uri", "{uri}"]),
    "ensemble": ("fer_sweep.ensemble", ["--tracking-uri", "{uri}", "--latest"]),
    "predict": ("fer_sweep.predict", ["--tracking-uri", "{uri}", "--run-id", "best", "x.png"]),
    "ui": ("fer_sweep.ui", ["--tracking-uri", "{uri}", "--port", "{port}"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bad_uri(kind: str, tmp: Path) -> str:
    if kind == "scheme":
        return "bogus://x"
    if kind == "postgresql":  # no driver here, or (with the team extra) nothing listening
        return "postgresql://u@127.0.0.1:1/db"
    if kind == "not_sqlite":
        (tmp / "f.db").write_text("these are not the runs you are looking for\n")
        return f"sqlite:///{tmp / 'f.db'}"
    if kind == "unwritable":  # /proc takes no new folder, even from root
        return "sqlite:////proc/fer_sweep_nowhere/mlflow.db"
    if kind == "password":  # would be saved with every run: refused, whatever the rest
        return "postgresql://u:secret-pw@127.0.0.1:1/db"
    if kind == "no_server":
        return f"http://127.0.0.1:{_free_port()}"
    raise AssertionError(kind)


BAD = ("scheme", "postgresql", "password", "not_sqlite", "unwritable", "no_server")


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("cli", sorted(CLIS))
def test_every_cli_names_a_bad_store_in_one_line(cli: str, bad: str, tmp_path: Path) -> None:
    uri = _bad_uri(bad, tmp_path)
    Image.new("L", (48, 48), 128).save(tmp_path / "x.png")  # predict's photo, if it got so far
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    module, template = CLIS[cli]
    args = [a.format(uri=uri, port=_free_port()) for a in template]
    proc = run_cli(args, cwd=tmp_path, module=module, timeout=120)
    line = one_error_line(proc)
    assert redact(uri) in line or uri.removeprefix("sqlite:///") in line, line
    assert "secret-pw" not in proc.stdout + proc.stderr  # a password is never printed
    # nothing created: no store, no run, no sweep folder; the bad file is left as it was
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert not any((tmp_path / d).exists() for d in ("mlruns", "mlflow.db", "multirun"))
    assert not Path("/proc/fer_sweep_nowhere").exists()
