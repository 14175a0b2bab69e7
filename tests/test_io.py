"""The one file envelope: every family shares the header, the schema check, migrations and registries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mechscope.errors import ConfigError
from mechscope.io import (
    Envelope,
    FileSchema,
    ModelInfo,
    read_envelope,
    read_json_envelope,
    register_schema,
    registered_schemas,
    write_envelope,
    write_json_envelope,
)
from mechscope.results import Artifact, Result

SCHEMA = FileSchema("test_widget", 3, "test widget", {1: lambda h: {**h, "kind": "v2"}, 2: lambda h: h})


def test_an_envelope_round_trips_tensors_body_kind_and_model(tmp_path):
    info = ModelInfo("abc123", "llama", d_model=8, n_layers=2, dtype="float32")
    env = Envelope("widget", {"a": [1, 2], "b": {"c": "<x>"}}, {"t": torch.arange(6.0).reshape(2, 3)}, info)
    path = write_envelope(tmp_path / "w.safetensors", env, SCHEMA)
    back = read_envelope(path, SCHEMA)
    assert (back.kind, back.body, back.model, back.schema_version) == ("widget", env.body, info, 3)
    torch.testing.assert_close(back.tensors["t"], env.tensors["t"])
    assert not list(tmp_path.glob("*.tmp"))
    json_path = write_json_envelope(tmp_path / "w.json", Envelope("widget", {"x": 1}, model=info), SCHEMA)
    again = read_json_envelope(json_path, SCHEMA)
    assert (again.kind, again.body, again.model) == ("widget", {"x": 1}, info)


def test_the_schema_check_migrates_older_files_and_names_both_versions_for_newer_ones(tmp_path):
    old = tmp_path / "old.safetensors"
    save_file({"t": torch.zeros(1)}, str(old), metadata={"format": "mechscope.test_widget", "schema_version": "1"})
    assert read_envelope(old, SCHEMA).kind == "v2"  # both registered steps ran
    newer = tmp_path / "newer.safetensors"
    save_file({"t": torch.zeros(1)}, str(newer), metadata={"format": "mechscope.test_widget", "schema_version": "9"})
    with pytest.raises(ConfigError, match=r"schema_version 9 is newer .*9 > 3"):
        read_envelope(newer, SCHEMA)
    with pytest.raises(ConfigError, match=r"reads versions 2\.\.3"):
        read_envelope(old, FileSchema("test_widget", 3, "test widget", {2: lambda h: h}))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"t": torch.zeros(1)}, str(wrong), metadata={"format": "mechscope.other"})
    with pytest.raises(ConfigError, match=r"expected format .mechscope\.test_widget."):
        read_envelope(wrong, SCHEMA)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"format": "mechscope.test_widget",\n "schema_version": 3,,}')
    with pytest.raises(ConfigError, match="line 2: malformed JSON"):
        read_json_envelope(bad_json, SCHEMA)


def test_a_result_file_of_schema_1_still_loads(tmp_path):
    path = tmp_path / "v1.safetensors"
    meta = {
        "format": "mechscope.result",
        "schema_version": "1",
        "method": "result",
        "config": json.dumps({"k": 1}),
        "description": json.dumps({"axes": {"x": ["layer"]}, "labels": {"layer": ["0", "1"]}}),
    }
    save_file({"x": torch.tensor([1.0, 2.0])}, str(path), metadata=meta)
    loaded = Result.load(path)
    assert loaded.config == {"k": 1} and loaded.labels == {"layer": ["0", "1"]}
    torch.testing.assert_close(loaded["x"], torch.tensor([1.0, 2.0]))


def test_registries_refuse_a_second_owner_of_a_name():
    with pytest.raises(ConfigError, match="already registered"):
        register_schema(FileSchema("result", 2, "another result"))
    assert "result" in registered_schemas() and "artifact" in registered_schemas()
    import mechscope.direction
    import mechscope.locate.probes  # noqa: F401  (registers the 'probes' result method)

    with pytest.raises(ConfigError, match="'probes' is already registered"):

        class Impostor(Result):
            method = "probes"

    with pytest.raises(ConfigError, match="'direction' is already registered"):

        class OtherDirection(Artifact):
            kind = "direction"


def _write_in_a_fresh_process(path):
    import subprocess
    import sys

    code = (
        "import torch; from mechscope.io import Envelope, FileSchema, write_envelope;"
        "s = FileSchema('test_repro', 1, 'repro');"
        f"write_envelope({str(path)!r}, Envelope('k', {{'z': 1, 'a': [1, 2]}}, "
        "{'w': torch.arange(4.0), 'b': torch.ones(2, dtype=torch.bfloat16)}), s)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_same_content_gives_the_same_bytes_in_every_process(tmp_path):
    """safetensors' own writer orders header metadata differently in every process; ours sorts it."""
    _write_in_a_fresh_process(tmp_path / "a.safetensors")
    _write_in_a_fresh_process(tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_every_dtype_round_trips_through_safetensors_own_reader(tmp_path):
    from safetensors.torch import load_file

    from mechscope.io import write_safetensors

    tensors = {
        "f32": torch.randn(2, 3),
        "bf16": torch.randn(4, dtype=torch.bfloat16),
        "f16": torch.randn(1, 2, dtype=torch.float16),
        "i64": torch.arange(3),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 5),
    }
    path = write_safetensors(tmp_path / "all.safetensors", tensors, {"k": "v"})
    back = load_file(str(path))
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    import os

    path = tmp_path / "w.safetensors"
    write_envelope(path, Envelope("k", {"v": 1}, {"t": torch.zeros(2)}), SCHEMA)
    before = path.read_bytes()

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_envelope(path, Envelope("k", {"v": 2}, {"t": torch.ones(2)}), SCHEMA)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


@pytest.mark.parametrize("race", ["mixed", "refused"])
def test_a_file_replaced_while_it_is_read_is_read_again_whole(tmp_path, monkeypatch, race):
    """A writer replacing the file mid-read (a training rewriting its checkpoint while someone reads it) must
    not give one version's body with another's tensors ("mixed"), nor a raw error from safetensors when its
    lookups straddle the replacement ("refused"); the reader reads the new file whole."""
    import mechscope.io as io

    path = tmp_path / "ckpt.safetensors"
    write_envelope(path, Envelope("k", {"step": 1}, {"w": torch.full((3,), 1.0)}), SCHEMA)
    real_open = io.safe_open
    calls = []

    def racing_open(name, **kwargs):
        calls.append(name)
        handle = real_open(name, **kwargs) if race == "mixed" else None
        if len(calls) == 1:  # the writer replaces the file between the reader's lookups
            write_envelope(path, Envelope("k", {"step": 2}, {"w": torch.full((3,), 2.0)}), SCHEMA)
            if race == "refused":
                raise RuntimeError("file size <27000> is smaller than the required mapping size <27016>")
        return handle if handle is not None else real_open(name, **kwargs)

    monkeypatch.setattr(io, "safe_open", racing_open)
    envelope = read_envelope(path, SCHEMA)
    assert envelope.body["step"] == 2 and envelope.tensors["w"].tolist() == [2.0] * 3
    assert len(calls) == 2, "read again once"


def test_a_file_that_keeps_being_replaced_gives_up_with_a_clear_error(tmp_path, monkeypatch):
    import mechscope.io as io

    path = tmp_path / "hot.safetensors"
    write_envelope(path, Envelope("k", {"step": 0}, {"w": torch.zeros(2)}), SCHEMA)
    real_open = io.safe_open
    step = iter(range(1, 100))

    def always_replaced(name, **kwargs):
        handle = real_open(name, **kwargs)
        write_envelope(path, Envelope("k", {"step": next(step)}, {"w": torch.zeros(2)}), SCHEMA)
        return handle

    monkeypatch.setattr(io, "safe_open", always_replaced)
    with pytest.raises(ConfigError, match="replaced 5 times while being read"):
        read_envelope(path, SCHEMA)


def test_a_runtime_error_of_an_unchanged_file_is_not_disguised(tmp_path, monkeypatch):
    import mechscope.io as io

    path = tmp_path / "w.safetensors"
    write_envelope(path, Envelope("k", {}, {"w": torch.zeros(2)}), SCHEMA)

    def out_of_memory(name, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(io, "safe_open", out_of_memory)
    with pytest.raises(RuntimeError, match="allocate"):
        read_envelope(path, SCHEMA)


@pytest.fixture
def umask_027():
    import os

    before = os.umask(0o027)
    yield
    os.umask(before)


def test_saved_files_get_the_mode_open_would_give_or_keep_the_old_one(tmp_path, umask_027):
    """Atomic writes go through mkstemp (mode 0600); the saved file must not stay private to its owner
    (a report served by a web server, results on a shared machine), nor lose a mode its owner chose."""
    import stat

    from mechscope.io import give_default_mode, write_text_atomic

    def mode(p):
        return stat.S_IMODE(p.stat().st_mode)

    path = tmp_path / "w.safetensors"
    write_envelope(path, Envelope("k", {}, {"t": torch.zeros(2)}), SCHEMA)
    assert mode(path) == 0o640, "0666 under umask 027"
    path.chmod(0o600)
    write_envelope(path, Envelope("k", {"v": 2}, {"t": torch.ones(2)}), SCHEMA)
    assert mode(path) == 0o600, "a rewrite keeps the owner's choice"
    assert mode(write_text_atomic(tmp_path / "report.html", "<html></html>")) == 0o640

    import tempfile

    staged = Path(tempfile.mkdtemp(dir=tmp_path))
    assert mode(staged) == 0o700
    give_default_mode(staged)
    assert mode(staged) == 0o750, "0777 under umask 027"


def test_the_umask_is_read_without_proc_too(umask_027, monkeypatch):
    import os

    from mechscope import io

    assert io._umask() == 0o027
    real = Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self).startswith("/proc"):
            raise OSError("no /proc here")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)
    assert io._umask() == 0o027
    assert os.umask(0o027) == 0o027, "left as it was"


def test_a_streamed_write_that_fails_midway_leaves_the_old_file(tmp_path):
    from mechscope.io import atomic_file

    path = tmp_path / "big.gguf"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="chunk missing"), atomic_file(path) as out:
        out.write(b"new part")
        raise ValueError("chunk missing")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["big.gguf"]
    with atomic_file(path) as out:
        out.write(b"new ")
        out.write(b"whole")
    assert path.read_bytes() == b"new whole"
