"""Two processes recording into one store at once lose nothing and leave a consistent database."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap

import pytest

from mechscope import records

WRITER = textwrap.dedent(
    """
    import sys, torch
    from mechscope import records
    from mechscope.results import Result

    store_dir, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with records.open_store(store_dir) as store:
        for i in range(n):
            with records.run(f"{who}-{i}", tags=[who], store=store, config={"i": i}) as run:
                run.log_metric("i", i)
                run.log_result(Result(tensors={"x": torch.tensor([float(i), 1.0])}, axes={"x": ("k",)}))
    """
)


@pytest.mark.slow
def test_two_processes_writing_100_records_each_lose_none(tmp_path):
    store_dir = tmp_path / "runs"
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(store_dir), who, "100"], stderr=subprocess.PIPE, text=True)
        for who in ("alpha", "beta")
    ]
    errors = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with records.open_store(store_dir) as store:
        runs = store.runs()
        assert len(runs) == 200
        for who in ("alpha", "beta"):
            mine = sorted((r for r in runs if r.tags == (who,)), key=lambda r: r.config["i"])
            assert [r.name for r in mine] == [f"{who}-{i}" for i in range(100)]
            assert all(r.status == "finished" and r.metric("i") == r.config["i"] for r in mine)
            assert all(len(r.artifacts) == 1 and store.artifact_path(r.artifacts[0]).is_file() for r in mine)
        # the two writers made the same 100 results: content addressing stores each once
        assert len(store.artifacts.files()) == 100
    conn = sqlite3.connect(store_dir / "runs.sqlite")
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT count(*) FROM artifacts").fetchone()[0] == 200
    assert not list((store_dir / "artifacts" / "tmp").iterdir())  # no staged file left behind
