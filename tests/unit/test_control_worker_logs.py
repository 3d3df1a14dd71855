"""The decision logs of ``vstack run --workers N``: worker k > 0 writes ``<db>-w<k>``;
``vstack learn`` reads the file it is given and its ``-w<k>`` siblings (``worker_dbs``)."""

from __future__ import annotations

from pathlib import Path

from learning.cli import _load
from learning.synth import synthesize
from vstack.workers import worker_db, worker_dbs


def test_worker_dbs_finds_the_siblings_that_exist(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.sqlite'}"
    assert worker_dbs(url) == [url]
    for k in (1, 2):
        Path(worker_db(url, k)[len("sqlite:///"):]).touch()
    Path(worker_db(url, 4)[len("sqlite:///"):]).touch()  # not after a gap
    assert worker_dbs(url) == [url, worker_db(url, 1), worker_db(url, 2)]
    assert worker_dbs("postgresql://h/db") == ["postgresql://h/db"]


def test_learn_reads_every_worker_log(tmp_path: Path) -> None:
    base = tmp_path / "d.sqlite"
    url = f"sqlite:///{base}"
    synthesize(url, flows=40, seed=1, threshold=600, exploration=0.3)
    alone, rep1 = _load(url, None, ["live"])
    synthesize(worker_db(url, 1), flows=30, seed=2, threshold=600, exploration=0.3)
    both, rep = _load(url, None, ["live"])
    assert len(alone) == rep1.flows - rep1.without_outcome > 0
    assert rep1.flows == 40 and rep.flows == 40 + 30
    assert len(both) == len(alone) + (rep.flows - rep1.flows) - (
        rep.without_outcome - rep1.without_outcome)
