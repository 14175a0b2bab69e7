"""GGUF loading through transformers' GGUF route and mechscope's cache, on real (tiny) GGUF files.

The file is written with the ``gguf`` library's GGUFWriter from a tiny random Llama; loading it must give
that Llama's logits back (q/k permutation, names, tied/untied head all round-trip), the second load must
reuse the cache without converting, and a damaged or half-written cache must never be used.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the GGUF route needs `pip install 'mechscope[gguf]'`")
pytest.importorskip("accelerate", reason="the GGUF route needs `pip install 'mechscope[gguf]'`")

from gguf_files import reference_logits, write_tiny_gguf

from mechscope import load_model
from mechscope.errors import ConfigError, ModelNotFoundError
from mechscope.model import gguf as mg

pytestmark = pytest.mark.usefixtures("single_thread")

IDS = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf_src")
    path = folder / "tiny-llama.gguf"
    model, tok = write_tiny_gguf(path, "llama")
    return path, reference_logits(model, IDS), tok


@pytest.fixture(scope="module")
def converted(tiny_file, tmp_path_factory):
    """One conversion shared by the read-only tests (its cache root is not modified by them)."""
    root = tmp_path_factory.mktemp("gguf_cache")
    return mg.gguf_to_folder(tiny_file[0], cache_dir=root), root


def test_gguf_load_gives_the_source_model_logits(tiny_file, tmp_path):
    path, expected, _ = tiny_file
    model = load_model(path, cache_dir=tmp_path)
    assert model.dims.model_type == "llama" and model.dims.n_kv_heads == 2
    with torch.no_grad():
        logits = model(IDS)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_tied_embeddings_round_trip(tmp_path):
    path = tmp_path / "tied.gguf"
    hf, _ = write_tiny_gguf(path, "llama_tied", seed=5)
    model = load_model(path, cache_dir=tmp_path / "cache")
    assert model.hf_model.config.tie_word_embeddings
    embed, unembed = model.hf_model.get_input_embeddings().weight, model.hf_model.get_output_embeddings().weight
    assert embed.data_ptr() == unembed.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), reference_logits(hf, IDS), atol=1e-5, rtol=0)


def test_converted_folder_is_clean_and_manifested(converted, tiny_file):
    conv, root = converted
    assert not conv.reused and conv.folder.parent == root
    assert conv.folder.name == f"{conv.sha256[:20]}-float32"
    assert conv.sha256 == mg.sha256_file(tiny_file[0])
    config = json.loads((conv.folder / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model, not a GGUF-flagged one
    manifest = mg.verify_cached(conv.folder)
    assert manifest["source_sha256"] == conv.sha256 and manifest["dtype"] == "float32"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    umask = os.umask(0o022)
    os.umask(umask)
    for path in (conv.folder, conv.folder / mg.MANIFEST):  # not mkdtemp's / mkstemp's private 0700 / 0600
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_second_load_reuses_the_cache_without_converting(converted, tiny_file, monkeypatch):
    conv, root = converted

    def no_conversion(*_args, **_kwargs):
        raise AssertionError("a valid cache entry was converted again")

    monkeypatch.setattr(mg, "_convert", no_conversion)
    start = time.perf_counter()
    again = mg.gguf_to_folder(tiny_file[0], cache_dir=root)
    reuse_s = time.perf_counter() - start
    assert again.reused and again.folder == conv.folder and not again.rebuilt_corrupt
    assert reuse_s < max(1.0, conv.seconds)  # hashing a tiny folder; the conversion took conv.seconds
    model = load_model(tiny_file[0], cache_dir=root)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), tiny_file[1], atol=1e-5, rtol=0)


def test_cache_is_keyed_by_content_not_path(converted, tiny_file, tmp_path):
    conv, root = converted
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(tiny_file[0].read_bytes())
    assert mg.gguf_to_folder(copy, cache_dir=root, verify="size").folder == conv.folder


def test_digest_index_fast_path_and_invalidation(tmp_path):
    src = tmp_path / "a.gguf"
    src.write_bytes(b"GGUF" + b"\0" * 100)
    cache = tmp_path / "cache"
    first = mg.file_digest(src, cache)
    index = json.loads((cache / mg.INDEX).read_text())
    assert list(index.values()) == [first]
    # A recorded digest is trusted while (path, size, mtime) are unchanged ...
    (key,) = index
    (cache / mg.INDEX).write_text(json.dumps({key: "f" * 64}))
    assert mg.file_digest(src, cache) == "f" * 64
    # ... and a changed file is hashed again.
    src.write_bytes(b"GGUF" + b"\1" * 100)
    os.utime(src, ns=(1, 1))
    assert mg.file_digest(src, cache) == mg.sha256_file(src) != first


def _fresh(tiny_file, tmp_path) -> mg.GGUFConversion:
    return mg.gguf_to_folder(tiny_file[0], cache_dir=tmp_path)


def test_truncated_cache_file_is_detected_and_rebuilt(tiny_file, tmp_path):
    conv = _fresh(tiny_file, tmp_path)
    weights = conv.folder / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size // 2)
    with pytest.raises(mg.CorruptCacheError, match="truncated"):
        mg.verify_cached(conv.folder, "size")
    rebuilt = _fresh(tiny_file, tmp_path)
    assert rebuilt.rebuilt_corrupt and not rebuilt.reused and weights.stat().st_size == size
    model = load_model(tiny_file[0], cache_dir=tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), tiny_file[1], atol=1e-5, rtol=0)


def test_altered_bytes_are_caught_by_content_checks(tiny_file, tmp_path):
    conv = _fresh(tiny_file, tmp_path)
    weights = conv.folder / "model.safetensors"
    with open(weights, "r+b") as handle:  # the last block is always sampled
        handle.seek(weights.stat().st_size - 8)
        handle.write(b"\x7f" * 8)
    mg.verify_cached(conv.folder, "size")  # same size: only a content hash can tell
    for level in ("sample", "full"):
        with pytest.raises(mg.CorruptCacheError, match=r"sha256|sampled"):
            mg.verify_cached(conv.folder, level)
    assert mg.gguf_to_folder(tiny_file[0], cache_dir=tmp_path).rebuilt_corrupt


def test_sampled_check_reads_evenly_spaced_blocks(tmp_path):
    path = tmp_path / "big.bin"
    block, blocks = 16, 4
    path.write_bytes(bytes(range(256)) * 4)  # 1024 bytes; blocks at 0, 336, 672, 1008
    before = mg.sample_digest(path, blocks, block)
    data = bytearray(path.read_bytes())
    data[500] ^= 1  # between sampled blocks: invisible to the sample, visible to the full hash
    path.write_bytes(bytes(data))
    assert mg.sample_digest(path, blocks, block) == before
    data[340] ^= 1  # inside the second block
    path.write_bytes(bytes(data))
    assert mg.sample_digest(path, blocks, block) != before


def test_folder_without_manifest_is_never_used(tiny_file, tmp_path):
    conv = _fresh(tiny_file, tmp_path)
    (conv.folder / mg.MANIFEST).unlink()  # what a copy interrupted before its last step looks like
    with pytest.raises(mg.CorruptCacheError, match="manifest"):
        mg.verify_cached(conv.folder)
    again = _fresh(tiny_file, tmp_path)
    assert again.rebuilt_corrupt and (again.folder / mg.MANIFEST).is_file()


def test_interrupted_conversion_leaves_no_folder(tiny_file, tmp_path, monkeypatch):
    real_convert = mg._convert

    def convert_then_die(source: Path, target: Path, dtype: str) -> None:
        real_convert(source, target, dtype)
        with open(target / "model.safetensors", "r+b") as handle:
            handle.truncate(100)
        raise KeyboardInterrupt  # e.g. Ctrl-C while the files are being written

    monkeypatch.setattr(mg, "_convert", convert_then_die)
    with pytest.raises(KeyboardInterrupt):
        mg.gguf_to_folder(tiny_file[0], cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []  # nothing under the final or a temp name
    monkeypatch.setattr(mg, "_convert", real_convert)
    assert not _fresh(tiny_file, tmp_path).rebuilt_corrupt


def test_dtype_is_part_of_the_key(tiny_file, converted):
    conv, root = converted
    half = mg.gguf_to_folder(tiny_file[0], cache_dir=root, dtype="bfloat16")
    assert half.folder != conv.folder and half.folder.name.endswith("-bfloat16")
    model = load_model(tiny_file[0], cache_dir=root, dtype=torch.bfloat16)
    assert model.hf_model.model.embed_tokens.weight.dtype == torch.bfloat16


def test_half_precision_loads_reuse_a_float32_conversion(tiny_file, tmp_path, monkeypatch):
    # Converting to bf16 dequantises to fp32 and casts; loading the fp32 folder with dtype= casts the same
    # weights the same way, so an existing fp32 entry serves every dtype without a second conversion.
    path = tiny_file[0]
    separate = load_model(path, cache_dir=tmp_path / "separate", dtype=torch.bfloat16)  # its own bf16 entry
    root = tmp_path / "shared"
    full = mg.gguf_to_folder(path, cache_dir=root)

    def no_conversion(*_args, **_kwargs):
        raise AssertionError("a float32 entry existed; nothing should be converted")

    monkeypatch.setattr(mg, "_convert", no_conversion)
    for dtype in (torch.bfloat16, torch.float16):
        reused = load_model(path, cache_dir=root, dtype=dtype)
        assert reused.hf_model.model.embed_tokens.weight.dtype == dtype
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) == [full.folder.name]
    reused = load_model(path, cache_dir=root, dtype=torch.bfloat16)
    assert reused.fingerprint() == separate.fingerprint()
    for (name, a), (_, b) in zip(reused.hf_model.state_dict().items(), separate.hf_model.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        assert torch.equal(reused(IDS), separate(IDS))
    assert mg.find_cached(path, dtype="bfloat16", cache_dir=root) is None
    assert mg.find_cached(path, cache_dir=root) == full.folder


def test_cache_root_resolution(monkeypatch, tmp_path):
    assert mg.cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.setenv(mg.CACHE_ENV, str(tmp_path / "env"))
    assert mg.cache_root() == tmp_path / "env" / "gguf"
    monkeypatch.delenv(mg.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert mg.cache_root() == tmp_path / "xdg" / "mechscope" / "gguf"


def test_bad_sources_and_options(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"expected a \.gguf file"):
        load_model(tmp_path / "absent.gguf", cache_dir=tmp_path)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(mg.GGUFError, match="not a GGUF file"):
        load_model(fake, cache_dir=tmp_path)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 64)
    with pytest.raises(mg.GGUFError, match="could not read"):
        mg.gguf_to_folder(broken, cache_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == []
    with pytest.raises(ConfigError, match="dtype"):
        mg.gguf_to_folder(fake, cache_dir=tmp_path, dtype="int8")
    with pytest.raises(ConfigError, match="verify"):
        mg.verify_cached(tmp_path, verify="quick")  # type: ignore[arg-type]


def test_clear_cache(tiny_file, tmp_path):
    _fresh(tiny_file, tmp_path)
    assert mg.clear_cache(tmp_path) == 1
    assert [p for p in tmp_path.iterdir()] == []


#: How many processes load the same GGUF file for the first time at once (issue 15: 18 must all succeed).
N_CONCURRENT = 18
_BARRIER = None


def _start_together(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _first_load(args: tuple[str, str, str]) -> tuple[bool, str, float]:
    """One process's first load (pool worker, forked): wait for every other worker, then load the GGUF
    file through ``load_model``. Returns (whether this process converted, the model's folder, max logit error)."""
    path, root, marks = args
    torch.set_num_threads(1)
    convert = mg._convert
    converted = False

    def counted(*a, **k):
        nonlocal converted
        converted = True
        (Path(marks) / str(os.getpid())).touch()
        return convert(*a, **k)

    mg._convert = counted
    assert _BARRIER is not None
    _BARRIER.wait(timeout=120)
    model = load_model(path, cache_dir=root)
    with torch.no_grad():
        logits = model(IDS)
    return converted, str(mg.gguf_to_folder(path, cache_dir=root).folder), float((logits - EXPECTED[path]).abs().max())


#: path -> reference logits, set before the pool forks (the workers inherit it).
EXPECTED: dict[str, torch.Tensor] = {}


# Python 3.12+ warns that forking a process with threads (torch's pool) may deadlock the child; the workers
# here only load a model and compute, and the fork is deliberate (no re-import of 18 interpreters).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_concurrent_first_loads_all_succeed_and_convert_once(tiny_file, tmp_path):
    """18 processes loading the same GGUF file at once wait for one conversion instead of deleting each other's
    folder (which happened when a second finisher replaced the first's folder while others read it). Workers
    are forked from this process (no re-import) and released together by a barrier."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    path, root, marks = str(tiny_file[0]), tmp_path / "cache", tmp_path / "marks"
    marks.mkdir()
    EXPECTED[path] = tiny_file[1]
    barrier = context.Barrier(N_CONCURRENT)
    with context.Pool(N_CONCURRENT, initializer=_start_together, initargs=(barrier,)) as pool:
        outcomes = pool.map(_first_load, [(path, str(root), str(marks))] * N_CONCURRENT, chunksize=1)
    assert len(outcomes) == N_CONCURRENT
    assert len({folder for _, folder, _ in outcomes}) == 1
    assert sum(converted for converted, _, _ in outcomes) == 1 and len(list(marks.iterdir())) == 1  # one conversion
    assert max(error for _, _, error in outcomes) < 1e-5  # every process got the source model's logits
    mg.verify_cached(Path(outcomes[0][1]), "full")
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
