"""`mechscope clean`: orphans of killed writes (made by the real writers, killed with os._exit) are listed on a
dry run, removed with --yes once older than the grace period, and nothing else is ever touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mechscope.cli.clean import ORPHAN_FILE, ORPHAN_FOLDER, find_orphans
from mechscope.cli.errors import USER_ERROR
from mechscope.cli.main import app

runner = CliRunner()
HOUR = 3600


def _killed(code: str, cwd: Path) -> None:
    """Run `code` in a fresh interpreter that kills itself (os._exit) at the patched point."""
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr


def _age(path: Path, seconds: float) -> None:
    """Make `path` (and everything inside) look `seconds` old."""
    then = time.time() - seconds
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (then, then), follow_symlinks=False)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A folder holding real orphans from killed writers and look-alikes to keep (made once per module)."""
    root = tmp_path_factory.mktemp("made") / "work"
    (root / "results").mkdir(parents=True)
    # The atomic writer killed between its fsync and its rename.
    _killed(
        "import os; import mechscope.io as io; os.replace = lambda *a: os._exit(9);"
        "io.write_text_atomic('results/summary.json', '{\"a\": 1}')",
        root,
    )
    # An organism's staged save killed before the swap.
    tests = str(Path(__file__).parent)
    _killed(
        f"import os, sys; sys.path.insert(0, {tests!r}); from tiny_models import tiny_model;"
        "import mechscope.zoo.loading as zl; zl._swap_in = lambda *a: os._exit(9);"
        "m, t = tiny_model('gpt2'); zl.save_organism(m, t, __import__('pathlib').Path('organism'))",
        root,
    )
    # A GGUF conversion folder and a cache entry being discarded (names as gguf.py makes them).
    (root / "gguf" / ".abc123-float32.tmp-k2j4_x9q").mkdir(parents=True)
    (root / "gguf" / ".abc123-float32.tmp-k2j4_x9q" / "model.safetensors").write_bytes(b"x" * 100)
    (root / "gguf" / ".abc123-float32.discard-4242-123456789").mkdir()
    # Look-alikes that are not temporaries, and real results.
    for name in (".gitignore", "notes.tmp", ".hidden.tmp", ".a.tmp", "model.safetensors", ".config.settings"):
        (root / "results" / name).write_text("keep")
    (root / "results" / ".cache.new-folder").mkdir()  # 6 characters after 'new-': not mkdtemp's
    (root / "results" / ".x.12345678.tmp").symlink_to("model.safetensors")
    return root


@pytest.fixture
def tree(made, tmp_path):
    """A fresh copy of `made` in which everything is two hours old."""
    root = tmp_path / "work"
    shutil.copytree(made, root, symlinks=True)
    for path in root.rglob("*"):
        _age(path, 2 * HOUR)
    return root


def _names(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_real_writers_leave_names_the_cleaner_recognises(tree):
    orphans = {o.path.name: o for o in find_orphans(tree)}
    files = [n for n in orphans if not orphans[n].is_folder]
    folders = sorted(n for n in orphans if orphans[n].is_folder)
    assert len(files) == 1 and files[0].startswith(".summary.json.") and ORPHAN_FILE.match(files[0])
    assert [n.split("-")[0] for n in folders] == [".abc123", ".abc123", ".organism.new"]
    assert all(ORPHAN_FOLDER.match(n) for n in folders)
    staged = next(o for o in orphans.values() if o.path.name.startswith(".organism.new-"))
    assert (staged.path / "model.safetensors").is_file() and staged.size > 10_000  # a whole staged save
    assert not (tree / "organism").exists()  # the kill came before the swap


def test_dry_run_lists_and_removes_nothing(tree):
    before = _names(tree)
    result = runner.invoke(app, ["clean", str(tree)])
    assert result.exit_code == 0, result.output
    assert result.output.count("  orphan  ") == 4
    assert "4 orphan(s) older than 3600 s" in result.output and "--yes" in result.output
    assert _names(tree) == before


def test_yes_removes_old_orphans_only_and_keeps_young_ones_and_look_alikes(tree):
    young = next(tree.glob("results/.summary.json.*.tmp"))
    young.touch()  # being written right now by another process
    before = _names(tree)
    result = runner.invoke(app, ["clean", str(tree), "--yes"])
    assert result.exit_code == 0, result.output
    assert "removed 3 orphan(s)" in result.output and "kept 1 younger" in result.output
    gone = before - _names(tree)
    assert {g for g in gone if "/" not in g.removeprefix("gguf/").removeprefix("results/")} >= {
        "gguf/.abc123-float32.tmp-k2j4_x9q",
        "gguf/.abc123-float32.discard-4242-123456789",
    }
    assert not [g for g in gone if g.startswith("results/")]  # the young temporary and every look-alike stay
    assert young.exists() and (tree / "results" / ".x.12345678.tmp").is_symlink()
    assert (tree / "results" / "model.safetensors").read_text() == "keep"
    # A grace of zero removes the young one too.
    result = runner.invoke(app, ["clean", str(tree), "--yes", "--grace", "0"])
    assert result.exit_code == 0 and "removed 1 orphan(s)" in result.output
    assert not young.exists() and not list(find_orphans(tree))


def test_bad_options_are_clear(tmp_path):
    result = runner.invoke(app, ["clean", str(tmp_path / "absent")])
    assert result.exit_code == USER_ERROR and "Traceback" not in result.output
    assert "expected a folder" in result.output and "absent" in result.output
    result = runner.invoke(app, ["clean", str(tmp_path), "--grace", "-5"])
    assert result.exit_code == USER_ERROR and "--grace must be a number of seconds >= 0; got -5" in result.output


def test_default_folders_are_the_caches_and_output(tmp_path, monkeypatch):
    from mechscope.cli.clean import default_folders

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MECHSCOPE_OUT", str(tmp_path / "out"))
    (tmp_path / "cache" / "gguf").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    orphan = tmp_path / "cache" / "gguf" / ".x.json.abcd1234.tmp"
    orphan.write_text("{")
    _age(orphan, 2 * HOUR)
    folders = default_folders()
    assert folders[:2] == [tmp_path / "cache", tmp_path / "out"]
    result = runner.invoke(app, ["clean", "--yes"])
    assert result.exit_code == 0 and str(orphan) in result.output and not orphan.exists()
