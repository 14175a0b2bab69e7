"""The sharded activation store: what it holds, exact shuffled epochs, kill -9 resumption, corruption,
a full disk, and bad input."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from store_cases import SITES, TEXTS, collect_args

from mechscope.errors import ConfigError
from mechscope.features.store import ActivationStore, CorruptShardError, collect_activations, collect_store, writer
from mechscope.features.store.manifest import MANIFEST

pytestmark = pytest.mark.usefixtures("single_thread")
CHILD = Path(__file__).with_name("_kill_child.py")


@pytest.fixture(scope="module")
def case():
    return collect_args()


def _collect(case, folder: Path, **over):
    model, texts, kwargs = case
    kwargs = {**kwargs, **over}
    return collect_store(model, kwargs.pop("sites"), texts, folder, **kwargs)


def test_a_store_holds_the_sites_activations_and_tokens_of_the_packed_corpus(case, tmp_path):
    model = case[0]
    store = _collect(case, tmp_path / "s")
    assert store.complete and store.sites == tuple(SITES) and store.n_shards > 3
    for site in SITES:  # the same packing and forward pass as the in-memory path, shard by shard
        expected = collect_activations(model, site, TEXTS, seq_len=16)
        torch.testing.assert_close(store.activations(site), expected, rtol=0, atol=0)
    tokens = torch.cat(list(store.tokens()))
    assert tokens.shape == (store.n_tokens // 15, 16)
    assert store.manifest.model.fingerprint == model.fingerprint()


def test_a_shuffled_read_yields_every_row_exactly_once_per_epoch_mixing_shards(case, tmp_path):
    store = _collect(case, tmp_path / "s")
    ref = store.activations(SITES[0])
    batches = list(store.batches(7, sites=SITES, seed=3, epochs=2, buffer_tokens=40))
    first = torch.cat([b[0] for b in batches])
    assert first.shape[0] == 2 * ref.shape[0]
    for epoch in first.split(ref.shape[0]):  # a permutation of the rows, each epoch
        assert torch.equal(epoch[torch.argsort(epoch[:, 0])], ref[torch.argsort(ref[:, 0])])
    other = torch.cat([b[1] for b in batches])  # the second site stays aligned with the first
    pairs = {tuple(a.tolist()): tuple(b.tolist()) for a, b in zip(ref, store.activations(SITES[1]), strict=True)}
    assert all(pairs[tuple(a.tolist())] == tuple(b.tolist()) for a, b in zip(first[:50], other[:50], strict=True))
    shard_of = torch.arange(ref.shape[0]) // (4 * 15)
    row_index = {tuple(r.tolist()): i for i, r in enumerate(ref)}
    per_batch = [len(set(shard_of[[row_index[tuple(r.tolist())] for r in b[0]]].tolist())) for b in batches]
    assert sum(per_batch) / len(per_batch) > 2  # batches mix rows of several shards
    again = torch.cat([b[0] for b in store.batches(7, sites=SITES, seed=3, epochs=2, buffer_tokens=40)])
    assert torch.equal(first, again)  # deterministic given the seed
    assert not torch.equal(first[: ref.shape[0]], first[ref.shape[0] :])  # each epoch reshuffles


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_storage_halves_the_bytes_and_rounds_the_values(case, tmp_path, dtype):
    full = _collect(case, tmp_path / "fp32")
    half = _collect(case, tmp_path / dtype, dtype=dtype)
    assert half.manifest.bytes < 0.62 * full.manifest.bytes
    a, b = full.activations(SITES[0]), half.activations(SITES[0])
    assert 0 < float((a - b).abs().max()) <= 0.01 * float(a.abs().max())


def test_a_collection_killed_with_sigkill_resumes_to_the_same_store(case, tmp_path):
    reference = _collect(case, tmp_path / "ref")
    folder = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    child = subprocess.Popen([sys.executable, str(CHILD), "collect", str(folder)], env=env)
    deadline = time.time() + 120
    while time.time() < deadline:
        manifest = folder / MANIFEST
        if manifest.is_file() and len(json.loads(manifest.read_text())["body"]["shards"]) >= 3:
            break
        if child.poll() is not None:
            pytest.fail("the child finished or died before it could be killed")
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    partial = ActivationStore(folder)
    assert not partial.complete and 3 <= partial.n_shards < reference.n_shards
    list(partial.batches(16))  # a partial store reads its complete shards
    resumed = _collect(case, folder)
    assert resumed.complete
    assert resumed.n_shards == reference.n_shards
    for index in range(reference.n_shards):  # equal tensors (the header's metadata order varies by process)
        got, want = resumed.shard(index), reference.shard(index)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not list(folder.glob(".*.tmp"))


def test_a_full_disk_leaves_only_complete_shards_and_the_collection_resumes(case, tmp_path, monkeypatch):
    original = writer._write_bytes
    calls = {"n": 0}

    def full_disk(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # half the bytes land in the temporary file, then the disk is full
            tmp = path.with_name(f".{path.stem}.partial.tmp")
            tmp.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, data)

    monkeypatch.setattr(writer, "_write_bytes", full_disk)
    with pytest.raises(ConfigError, match=r"failed .*No space left.*keeps its 2 complete shards"):
        _collect(case, tmp_path / "s")
    store = ActivationStore(tmp_path / "s")
    assert store.n_shards == 2 and not store.complete
    assert sum(b.shape[0] for b in store.batches(16)) == 2 * 4 * 15
    monkeypatch.setattr(writer, "_write_bytes", original)
    done = _collect(case, tmp_path / "s")
    assert done.complete and done.n_tokens == _collect(case, tmp_path / "ref").n_tokens


def test_a_corrupted_shard_is_detected_by_its_hash_and_refused_or_skipped(case, tmp_path):
    store = _collect(case, tmp_path / "s")
    path = tmp_path / "s" / store.manifest.shards[1]["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match=r"shard 1 does not match its SHA-256"):
        list(store.batches(16))
    rows = sum(b.shape[0] for b in store.batches(16, on_corrupt="skip"))
    assert rows == store.n_tokens - 4 * 15 and store.skipped == [1]


def test_bad_input_is_a_clear_error(case, tmp_path):
    store = _collect(case, tmp_path / "s")
    with pytest.raises(ConfigError, match="collected with other settings"):
        _collect(case, tmp_path / "s", seq_len=32)
    from mechscope.model.hooked import HookedModel
    from tiny_models import tiny_model

    other = HookedModel(*tiny_model("gpt2"))
    with pytest.raises(ConfigError, match="collected on another model"):
        store.check(other)
    with pytest.raises(ConfigError, match="collected on another model"):
        collect_store(other, SITES[0], TEXTS, tmp_path / "s")
    with pytest.raises(ConfigError, match=r"holds sites .* not \['blocks.1.hook_resid_pre'\]"):
        store.check(case[0], "blocks.1.hook_resid_pre")
    with pytest.raises(ConfigError, match=r"dtype one of \['bf16', 'fp16', 'fp32'\], got 'int8'"):
        _collect(case, tmp_path / "t", dtype="int8")
    with pytest.raises(ConfigError, match="no activation store"):
        ActivationStore(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("x")
    with pytest.raises(ConfigError, match="expected an empty folder"):
        _collect(case, tmp_path / "junk")
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    manifest["body"]["settings"]["seq_len"] = 8
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="settings hash does not match"):
        ActivationStore(tmp_path / "s")


def test_a_resumed_collection_refuses_another_corpus(case, tmp_path):
    model, _, kwargs = case
    kwargs = dict(kwargs)
    sites = kwargs.pop("sites")
    folder = tmp_path / "s"
    original = writer._write_bytes
    calls = {"n": 0}

    def die(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.EIO, "simulated crash")
        original(path, data)

    writer._write_bytes = die
    try:
        with pytest.raises(ConfigError):
            collect_store(model, sites, TEXTS, folder, **kwargs)
    finally:
        writer._write_bytes = original
    with pytest.raises(ConfigError, match="corpus differs from the one shard 0"):
        collect_store(model, sites, list(reversed(TEXTS)), folder, **kwargs)
