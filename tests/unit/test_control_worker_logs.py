"""The decision logs of ``vstack run --workers N``: worker k > 0 writes ``<db>-w<k>``;
``vstack learn`` reads the file it is given and its ``-w<k>`` siblings (``worker_dbs``)."""

from __future__ import annotations

import json
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


def _set_daemon_run(url: str, run_id: int, daemon_run: str, wid: int) -> None:
    import sqlalchemy as sa

    from vstack.workers import run_config

    eng = sa.create_engine(url)
    with eng.begin() as conn:
        conn.execute(sa.text("UPDATE runs SET config = :c WHERE id = :i"),
                     {"c": json.dumps(run_config("vs0", wid, daemon_run, 2)), "i": run_id})
    eng.dispose()


def test_learn_run_selects_the_same_daemon_run_in_every_worker_log(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'd.sqlite'}"
    w1 = worker_db(url, 1)
    # run ids count on their own per file: the daemon's second run is run 2 in the
    # parent's log but run 1 in worker 1's (which logged nothing the first time)
    synthesize(url, flows=10, seed=1, threshold=600, exploration=0.3)
    synthesize(url, flows=20, seed=2, threshold=600, exploration=0.3)
    synthesize(w1, flows=30, seed=3, threshold=600, exploration=0.3)
    synthesize(w1, flows=40, seed=4, threshold=600, exploration=0.3)
    _set_daemon_run(url, 1, "A", 0)
    _set_daemon_run(url, 2, "B", 0)
    _set_daemon_run(w1, 1, "B", 1)
    _set_daemon_run(w1, 2, "C", 1)
    _, rep = _load(url, [2], ["live"])
    assert rep.flows == 20 + 30 and rep.runs == [2]  # by number it was 20 + 40
    _, rep = _load(url, [1], ["live"])
    assert rep.flows == 10  # worker 1 has no run of daemon run A


def test_every_worker_logs_the_same_run_info_shape() -> None:
    from vstack.workers import run_config

    a, b = run_config("vs0", 0, "X", 3), run_config("vs0", 2, "X", 3)
    assert set(a) == set(b) == {"name", "worker", "workers", "daemon_run"}
    assert a["daemon_run"] == b["daemon_run"] == "X" and b["worker"] == 2
