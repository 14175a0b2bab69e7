"""Run records: every field round-trips, capture is opt-in, schema and bad files are refused clearly, gc
deletes only unreferenced files, artifact paths stay inside the store."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import sys

import pytest
import torch

from mechscope import observe, records
from mechscope.errors import ConfigError
from mechscope.records import PathRefused, StoreError
from mechscope.records.schema import MIGRATIONS, SCHEMA_VERSION, connect_rw
from mechscope.results import Result


def _result(value: float = 1.0) -> Result:
    return Result(
        tensors={"scores": torch.full((2, 3), value), "total": torch.tensor(value * 6)},
        axes={"scores": ("layer", "pos"), "total": ()},
        labels={"layer": ["0", "1"], "pos": ["a", "b", "c"]},
        config={"prompt": "<script>alert(1)</script>", "n": 3},
    )


class _FakeModel:
    """Enough of a HookedModel for provenance: hf_model (config + parameters) and fingerprint()."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.hf_model = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.hf_model.weight.copy_(weight)
        self.hf_model.config = type("Config", (), {"model_type": "fake", "_name_or_path": "fake-folder"})()

    def fingerprint(self) -> str:
        return hashlib.sha256(self.hf_model.weight.detach().numpy().tobytes()).hexdigest()[:16]


def test_a_record_round_trips_every_field(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes.json"
    notes.write_text(json.dumps({"feature": 7, "text": "<b>top</b>"}))
    model = _FakeModel(torch.arange(6.0).reshape(2, 3))
    with records.run(
        "sweep <1>",
        tags=["ioi", "layer-scan"],
        store=tmp_path / "runs",
        config={"lr": 0.1, "nested": {"k": [1, 2]}},
        method="patching",
        model=model,
        model_source="my-model",
        seed=7,
        description="a description with <script>",
        command="python sweep.py",
    ) as run:
        first_random = torch.rand(1).item()
        result = _result(2.0)  # captured by itself
        run.log_metric("accuracy", 0.75)
        for step, loss in enumerate([3.0, 2.0, 1.5]):
            run.log_metric("loss", loss, step=step)
        run.log_config(extra="yes")
        run.log_file(notes)
        run.add_tags("late-tag")
        run_id = run.id
    torch.manual_seed(7)
    assert first_random == torch.rand(1).item()  # seed=7 seeded torch at the start

    with records.open_store(tmp_path / "runs") as store:
        r = store.get(run_id)
        path = store.artifact_path(r.artifacts[0])
    assert (r.name, r.status, r.method, r.seed, r.command) == (
        "sweep <1>",
        "finished",
        "patching",
        7,
        "python sweep.py",
    )
    assert r.description == "a description with <script>"
    assert r.config == {"lr": 0.1, "nested": {"k": [1, 2]}, "extra": "yes"}
    assert set(r.tags) == {"ioi", "layer-scan", "late-tag"}
    assert r.metrics == {"accuracy": {-1: 0.75}, "loss": {0: 3.0, 1: 2.0, 2: 1.5}, "result/total": {-1: 12.0}}
    assert r.metric("loss") == 1.5
    assert r.versions["torch"] == torch.__version__ and {"mechscope", "transformers", "python"} <= set(r.versions)
    assert r.cwd == str(tmp_path) and r.git_commit is None and r.git_dirty is None  # tmp_path is no git tree
    assert r.wall_s is not None and r.wall_s >= 0 and r.ended_at >= r.started_at and r.error == ""
    (m,) = r.models
    assert (m.source, m.fingerprint, m.model_type, m.n_params) == ("my-model", model.fingerprint(), "fake", 6)
    assert m.weights_sha256 == records.weights_sha256(model.hf_model)
    assert [(a.name, a.role, a.ext) for a in r.artifacts] == [
        ("result", "result", "safetensors"),
        ("notes.json", "file", "json"),
    ]
    assert (
        r.artifacts[0].cls == "mechscope.results.Result"
        and r.artifacts[0].config["prompt"] == "<script>alert(1)</script>"
    )
    assert hashlib.sha256(path.read_bytes()).hexdigest() == r.artifacts[0].sha256 == path.stem
    loaded = Result.load(path)
    assert torch.equal(loaded["scores"], result["scores"]) and loaded.labels == result.labels
    # the JSON export carries the same record
    exported = store_export = records.open_store(tmp_path / "runs").export([run_id])
    assert store_export["schema_version"] == SCHEMA_VERSION
    (doc,) = exported["runs"]
    assert doc == json.loads(json.dumps(r.to_json())) and doc["artifacts"][1]["path"].startswith("artifacts/")


def test_git_commit_of_the_working_directory_is_recorded(tmp_path, monkeypatch):
    import subprocess

    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }
    for cmd in (["git", "init", "-q"], ["git", "commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(repo)
    with records.run("in git", store=tmp_path / "runs") as run:
        pass
    r = records.open_store(tmp_path / "runs").get(run.id)
    assert r.git_commit == head and r.git_dirty is False


def test_capture_is_opt_in_scoped_and_failures_are_recorded(tmp_path):
    store_dir = tmp_path / "runs"
    _result()  # outside any run: nothing to record, no store created
    assert not store_dir.exists()
    with pytest.raises(ValueError, match="boom"), records.run("outer", store=store_dir) as outer:
        _result(1.0)
        with records.run("inner", store=store_dir) as inner:
            _result(2.0)
            _result(3.0)
        assert records.current_run.get() is outer
        raise ValueError("boom")
    assert records.current_run.get() is None
    with records.open_store(store_dir) as store:
        o, i = store.get(outer.id), store.get(inner.id)
    assert [a.name for a in o.artifacts] == ["result"] and [a.name for a in i.artifacts] == ["result", "result-2"]
    assert o.status == "failed" and o.error == "ValueError: boom" and i.status == "finished"
    _result()  # after the runs: still nothing recorded
    assert len(records.open_store(store_dir).ids()) == 2


def test_a_model_announced_through_observe_is_recorded_with_its_source(tmp_path):
    model = _FakeModel(torch.ones(2, 2))
    with records.run("loads a model", store=tmp_path, model_source="organism-x") as run:
        observe.notify(model)
        observe.notify(model)  # once per object
    (m,) = records.open_store(tmp_path).get(run.id).models
    assert m.source == "organism-x" and m.fingerprint == model.fingerprint()


def test_bad_input_to_a_run_is_refused_with_what_was_expected(tmp_path):
    with pytest.raises(ConfigError, match="non-empty name"):
        records.run("", store=tmp_path).__enter__()
    with pytest.raises(ConfigError, match="not one string"):
        records.run("x", tags="ioi", store=tmp_path).__enter__()
    with records.run("x", store=tmp_path) as run:
        with pytest.raises(ConfigError, match="must be a number"):
            run.log_metric("m", "high")
        with pytest.raises(ConfigError, match="NaN"):
            run.log_metric("m", float("nan"))
        with pytest.raises(ConfigError, match="JSON-serialisable"):
            run.log_config(model=object())
        with pytest.raises(ConfigError, match="no file"):
            run.log_file(tmp_path / "absent.json")
        with pytest.raises(ConfigError, match="save"):
            run.log_result(42)


def test_a_result_that_cannot_be_saved_does_not_lose_the_run(tmp_path):
    class Unsaveable:
        def save(self, path):
            raise OSError("disk on fire")

    with records.run("partial", store=tmp_path) as run:
        run.log_result(Unsaveable(), name="bad")
        run.log_metric("kept", 1.0)
    r = records.open_store(tmp_path).get(run.id)
    assert r.metrics == {"kept": {-1: 1.0}} and r.artifacts == ()
    assert "could not save bad" in r.error and "disk on fire" in r.error and r.status == "finished"


# Schema, migrations and bad files -----------------------------------------------------------------------------
def test_a_new_store_has_the_schema_version_its_migrations_and_wal(tmp_path):
    records.open_store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "runs.sqlite")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r[0] for r in conn.execute("SELECT version FROM migrations")] == [1]


def test_migrations_apply_in_order_once(tmp_path):
    db = tmp_path / "runs.sqlite"
    connect_rw(db).close()
    extra = (*MIGRATIONS, (2, "add a note column", "ALTER TABLE runs ADD COLUMN note TEXT NOT NULL DEFAULT ''"))
    for _ in range(2):  # the second open finds version 2 and applies nothing
        conn = connect_rw(db, extra)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert [r[0] for r in conn.execute("SELECT version FROM migrations ORDER BY version")] == [1, 2]
        conn.close()
    # this mechscope (schema 1) now refuses the store, naming both versions
    with pytest.raises(StoreError, match=r"schema version 2; this mechscope reads versions up to 1"):
        records.open_store(tmp_path)


def test_a_store_from_a_newer_schema_is_refused_and_left_untouched(tmp_path):
    records.open_store(tmp_path).close()
    db = tmp_path / "runs.sqlite"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    before = db.read_bytes()
    for read_only in (False, True):
        with pytest.raises(StoreError, match=rf"schema version {SCHEMA_VERSION + 5}.*up to {SCHEMA_VERSION}"):
            records.open_store(tmp_path, read_only=read_only)
    assert db.read_bytes() == before


def test_a_corrupt_database_is_refused_and_nothing_is_overwritten(tmp_path):
    db = tmp_path / "runs.sqlite"
    garbage = b"this is not sqlite" * 100
    db.write_bytes(garbage)
    for read_only in (False, True):
        with pytest.raises(StoreError, match=r"not a readable mechscope run database.*left untouched"):
            records.open_store(tmp_path, read_only=read_only)
    with pytest.raises(StoreError, match="not a readable"), records.run("x", store=tmp_path):
        pass
    assert db.read_bytes() == garbage and sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite"]
    other = tmp_path / "other"
    other.mkdir()
    conn = sqlite3.connect(other / "runs.sqlite")
    conn.execute("CREATE TABLE mine (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="not a mechscope run store"):
        records.open_store(other)


def test_read_only_opening_cannot_write_and_needs_a_store(tmp_path):
    with pytest.raises(StoreError, match="no run database"):
        records.open_store(tmp_path / "absent", read_only=True)
    assert not (tmp_path / "absent").exists()
    with records.run("x", store=tmp_path):
        pass
    with records.open_store(tmp_path, read_only=True) as store:
        assert len(store.ids()) == 1
        with pytest.raises(StoreError, match="read-only"):
            store.delete_run(store.ids()[0])
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store._conn.execute("DELETE FROM runs")


def test_unknown_run_ids_name_close_ones(tmp_path):
    with records.run("x", store=tmp_path) as run:
        pass
    with pytest.raises(StoreError, match=r"no run 'nope'"):
        records.open_store(tmp_path).get("nope")
    with pytest.raises(StoreError, match=run.id):
        records.open_store(tmp_path).get(run.id[:-2])


# gc -----------------------------------------------------------------------------------------------------------------
def test_gc_deletes_only_unreferenced_artifacts(tmp_path):
    with records.run("a", store=tmp_path) as a:
        _result(1.0)
        _result(5.0)
    with records.run("b", store=tmp_path) as b:
        _result(1.0)  # same bytes as a's first result: stored once
    store = records.open_store(tmp_path)
    shared, only_a = (store.artifact_path(x) for x in store.get(a.id).artifacts)
    assert store.artifact_path(store.get(b.id).artifacts[0]) == shared
    orphan = tmp_path / "artifacts" / "ab" / ("ab" + "0" * 62 + ".safetensors")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"left by a crash")
    stale = tmp_path / "artifacts" / "tmp" / "123-abc.safetensors"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    fresh = stale.with_name("456-def.safetensors")
    fresh.write_bytes(b"a writer is still staging this")

    dry = store.gc(dry_run=True)
    assert set(dry.removed) == {orphan, stale} and orphan.exists() and stale.exists()
    report = store.gc()
    assert set(report.removed) == {orphan, stale} and report.kept == 2
    assert shared.exists() and only_a.exists() and fresh.exists() and not orphan.exists() and not stale.exists()

    store.delete_run(a.id)
    assert set(store.gc().removed) == {only_a} and shared.exists()  # b still references the shared file
    store.delete_run(b.id)
    assert set(store.gc().removed) == {shared}
    assert store.gc().removed == ()


# Paths ------------------------------------------------------------------------------------------------------------
def test_artifact_paths_are_resolved_inside_the_store_only(tmp_path):
    with records.run("a", store=tmp_path / "store") as run:
        _result()
    store = records.open_store(tmp_path / "store")
    art = store.get(run.id).artifacts[0]
    good = store.artifact_path(art)
    assert good.is_file() and good.is_relative_to((tmp_path / "store" / "artifacts").resolve())
    folder = store.artifacts
    for bad, why in [
        ("artifacts/../runs.sqlite", "'\\.\\.'"),
        ("../../etc/passwd", "'\\.\\.'"),
        ("/etc/passwd", "absolute"),
        ("C:/Windows/win.ini", "absolute"),
        ("artifacts/ab//x", "empty part"),
        ("runs.sqlite", "not under artifacts"),
    ]:
        with pytest.raises(PathRefused, match=why):
            folder.resolve(bad)
    for sha in ("../../etc/passwd", "A" * 64, "ab", art.sha256 + "/.."):
        with pytest.raises(PathRefused, match="not a SHA-256"):
            folder.path(sha, "safetensors")
    with pytest.raises(PathRefused, match="extension"):
        folder.path(art.sha256, "py")
    # a symlink inside the store that points out of it is refused
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    sha = "cd" * 32
    link = tmp_path / "store" / "artifacts" / sha[:2] / f"{sha}.txt"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(secret)
    with pytest.raises(PathRefused, match="outside the store"):
        folder.path(sha, "txt")


def test_a_failure_to_write_the_record_does_not_hide_the_users_exception(tmp_path, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise StoreError("disk full")

    with pytest.raises(KeyError, match="users own") as caught, records.run("x", store=tmp_path) as run:
        monkeypatch.setattr(run.store, "finish_run", broken)
        raise KeyError("users own")
    if sys.version_info >= (3, 11):  # a note on the user's exception, printed with its traceback
        assert any("could not be written: disk full" in n for n in getattr(caught.value, "__notes__", []))
    else:  # no exception notes before 3.11: the logger says it
        assert "could not be written: disk full" in caplog.text


def test_without_exception_notes_the_lost_record_is_logged(tmp_path, monkeypatch, caplog):
    """Python 3.10's exceptions have no ``add_note``; the failure is logged instead of dropped."""

    class NoNotes(Exception):
        def __getattribute__(self, name):
            if name == "add_note":
                raise AttributeError(name)
            return super().__getattribute__(name)

    def broken(*args, **kwargs):
        raise StoreError("disk full")

    with pytest.raises(NoNotes), records.run("x", store=tmp_path) as run:
        monkeypatch.setattr(run.store, "finish_run", broken)
        raise NoNotes("users own")
    assert f"run {run.id} could not be written: disk full" in caplog.text


def test_capture_can_be_off_and_objects_saving_json_are_kept_as_json(tmp_path):
    class Cards:
        def save(self, path):
            path.write_text(json.dumps({"feature": 3, "contexts": ["a <b>"]}))
            return path

    with records.run("explicit only", store=tmp_path, capture=False) as run:
        _result(1.0)  # not recorded
        kept = _result(2.0)
        run.log_result(kept, name="kept")
        run.log_result(Cards(), name="cards")
    r = records.open_store(tmp_path).get(run.id)
    assert [(a.name, a.ext) for a in r.artifacts] == [("kept", "safetensors"), ("cards", "json")]
    cards = records.open_store(tmp_path).artifact_path(r.artifacts[1])
    assert json.loads(cards.read_text())["feature"] == 3 and r.error == ""
