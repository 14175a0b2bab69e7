"""Many ranks on the features jobs: one activation store collected by two gloo ranks (one manifest) equals
a one-process collection; SAEs trained with DistributedDataParallel equal single-process training on the
same global batches; a rank lost mid-collection leaves a readable store that a rerun completes, and a job
interrupted mid-training resumes from rank 0's checkpoint to the uninterrupted result."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import dist_features_job as job
import pytest
import torch
from safetensors.torch import load_file
from torchrun_job import torchrun

from mechscope.errors import ConfigError
from mechscope.features.sae import SAEConfig
from mechscope.features.store import ActivationStore, collect_store
from mechscope.features.store.distributed import collect_store_distributed
from mechscope.features.store.manifest import Manifest
from mechscope.features.store.parts import PARTS_KEY
from mechscope.features.train import SAETrainConfig, checkpoint_info, train_sae
from mechscope.model.loading import load_model
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

JOB = Path(__file__).with_name("dist_features_job.py")
#: DDP vs one process: the same arithmetic except the order of two sums (gradients averaged across ranks,
#: input statistics gathered in rank order). Measured max |difference| over all weights after 40 steps:
#: 4.2e-7 (fp32 rounding of weights of size ~0.1-1); 1e-5 admits that reassociation, not a wrong step.
ATOL = 1e-5


def _torchrun(folder: Path, out: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    return torchrun(JOB, folder, out, **env_extra)


@pytest.fixture(scope="module")
def two_rank_run(model_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = _torchrun(model_folder, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_model(model_folder), out


def _one_process_store(model, folder):
    return collect_store(
        model, job.SITE, job.TEXTS, folder, dtype="fp32", seq_len=job.SEQ_LEN, rows_per_shard=job.ROWS_PER_SHARD
    )


def _rows(store):
    tokens = torch.cat(list(store.tokens()))
    return tokens, store.activations(job.SITE).reshape(tokens.shape[0], -1)


# Collection -------------------------------------------------------------------------------------------
def test_two_ranks_write_one_store_equal_to_a_one_process_store(two_rank_run, tmp_path):
    model, out = two_rank_run
    store = ActivationStore(out / "store")
    single = _one_process_store(model, tmp_path / "one")
    on_disk = Manifest.load(out / "store")  # the one manifest, written by rank 0 after every rank finished
    assert on_disk.complete and on_disk.extra[PARTS_KEY]["world_size"] == 2
    assert store.complete and store.missing == []
    assert {s["rank"] for s in store.manifest.shards} == {0, 1}, "both ranks wrote shards"
    assert store.n_shards == single.n_shards and store.n_tokens == single.n_tokens
    tokens, acts = _rows(store)
    ref_tokens, ref_acts = _rows(single)
    # blocks are dealt round-robin and the manifest lists them by block: the same rows in the same order
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(acts, ref_acts, atol=1e-6, rtol=1e-5)


def test_one_process_collects_the_same_layout(tmp_path):
    hf, tok = tiny_model("llama")
    from mechscope.model.hooked import HookedModel

    model = HookedModel(hf, tok)
    args = {"dtype": "fp32", "seq_len": job.SEQ_LEN, "rows_per_shard": job.ROWS_PER_SHARD}
    store = collect_store_distributed(model, job.SITE, job.TEXTS, tmp_path / "d", **args)
    single = collect_store(model, job.SITE, job.TEXTS, tmp_path / "s", **args)
    assert store.complete and torch.equal(_rows(store)[1], _rows(single)[1])
    limited = collect_store_distributed(model, job.SITE, job.TEXTS, tmp_path / "dm", **args, max_tokens=40)
    ref = collect_store(model, job.SITE, job.TEXTS, tmp_path / "sm", **args, max_tokens=40)
    assert torch.equal(_rows(limited)[0], _rows(ref)[0]) and limited.n_tokens == ref.n_tokens == 42  # 6 rows of 7
    again = collect_store_distributed(model, job.SITE, job.TEXTS, tmp_path / "d", **args)  # complete: nothing to do
    assert again.manifest.shards == store.manifest.shards
    with pytest.raises(ConfigError, match="other settings"):
        collect_store_distributed(model, job.SITE, job.TEXTS, tmp_path / "d", **{**args, "rows_per_shard": 3})
    with pytest.raises(ConfigError, match="one process"):
        collect_store_distributed(model, job.SITE, job.TEXTS, tmp_path / "s", **args)
    with pytest.raises(ConfigError, match="several ranks"):
        collect_store(model, job.SITE, job.TEXTS, tmp_path / "d", **args)
    top = Manifest.load(tmp_path / "d")
    top.extra[PARTS_KEY]["world_size"] = 2
    top.complete = False
    top.save(tmp_path / "d")
    with pytest.raises(ConfigError, match="collected by 2 ranks"):
        collect_store_distributed(model, job.SITE, job.TEXTS, tmp_path / "d", **args)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="empty folder"):
        collect_store_distributed(model, job.SITE, job.TEXTS, tmp_path / "busy", **args)


# Training ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["relu", "topk", "topk-aux", "jumprelu"])
def test_ddp_training_on_a_tensor_equals_one_process_training(two_rank_run, name):
    _, out = two_rank_run
    config, cfg = job.TENSOR_RUNS[name]
    single, single_log = train_sae(job.tensor_data(), config, cfg)
    ranks = [load_file(out / f"tensor-{name}-rank{r}.safetensors") for r in range(2)]
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key}: the ranks hold the same SAE"
        torch.testing.assert_close(ranks[0][key], value, atol=ATOL, rtol=0)
    log = json.loads((out / f"tensor-{name}-log.json").read_text())
    assert [e["step"] for e in log] == [e["step"] for e in single_log]
    for got, want in zip(log, single_log, strict=True):  # logged figures are global means over the ranks
        assert got["mse"] == pytest.approx(want["mse"], rel=1e-4)
        assert got["dead_fraction"] == want["dead_fraction"]
    if name == "topk-aux":
        assert max(e["dead_fraction"] for e in log) > 0.3, "dead features (and AuxK) were exercised"


def test_ddp_batchtopk_keeps_the_ranks_in_step(two_rank_run):
    """BatchTopK selects within each rank's batch (documented), so only agreement between ranks is checked."""
    _, out = two_rank_run
    ranks = [load_file(out / f"tensor-batchtopk-rank{r}.safetensors") for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert float(ranks[0]["threshold"].max()) > 0


def _store_share(store, rank, world):
    view = copy.copy(store)
    view.manifest = copy.copy(store.manifest)
    view.manifest.shards = [s for i, s in enumerate(store.manifest.shards) if i % world == rank]
    return view


def test_ddp_training_on_a_store_equals_one_process_training_on_the_same_global_batches(two_rank_run):
    model, out = two_rank_run
    store = ActivationStore(out / "store")
    cfg = job.STORE_TRAIN
    local = cfg.batch_size // 2
    streams = [
        _store_share(store, r, 2).batches(local, sites=(job.SITE,), seed=cfg.seed, epochs=None) for r in range(2)
    ]
    global_batches = (torch.cat(pair) for pair in zip(*streams, strict=True))
    single, _ = train_sae(global_batches, job.store_sae_config(model.dims.d_model), cfg)
    ranks = [load_file(out / f"store-rank{r}.safetensors") for r in range(2)]
    for key, value in single.state_dict().items():
        assert torch.equal(ranks[0][key], ranks[1][key])
        torch.testing.assert_close(ranks[0][key], value, atol=ATOL, rtol=0)


def test_distributed_training_needs_a_process_group():
    with pytest.raises(ConfigError, match="torchrun"):
        train_sae(torch.randn(64, 8), SAEConfig(d_in=8, d_sae=16), SAETrainConfig(steps=2), distributed=True)


# A rank lost mid-collection, a job lost mid-training ---------------------------------------------------
def test_a_lost_rank_leaves_a_readable_store_and_reruns_fill_only_the_gap(model_folder, two_rank_run, tmp_path):
    _, full = two_rank_run
    lost = _torchrun(model_folder, tmp_path, MECHSCOPE_TEST_DIE="1:2", MECHSCOPE_TEST_SKIP_TENSOR="1")
    assert lost.returncode != 0, "rank 1 was killed, so the job fails"
    assert not Manifest.load(tmp_path / "store").complete, "the one manifest on disk says: incomplete"
    broken = ActivationStore(tmp_path / "store")  # readable: merged from the ranks' parts
    assert not broken.complete
    ranks_missing = {m["rank"]: m for m in broken.missing}
    assert ranks_missing[1]["shards_done"] == 2 and ranks_missing[1]["next_block"] == 5
    assert [s["block"] for s in broken.manifest.shards if s["rank"] == 1] == [1, 3]
    for index in range(broken.n_shards):  # every listed shard is complete and verifies by its hash
        assert broken.shard(index)["tokens"].shape[0] == broken.manifest.shards[index]["rows"]
    # the shards the merged manifest lists: a rank killed between renaming a shard into place and recording
    # it leaves an unlisted file, which the rerun may write again (rank 0 is stopped at any point by torchrun)
    listed = [tmp_path / "store" / entry["file"] for entry in broken.manifest.shards]
    kept = {p: p.stat().st_mtime_ns for p in listed}

    rerun = _torchrun(model_folder, tmp_path, MECHSCOPE_TEST_STOP_AT="10", MECHSCOPE_TEST_SKIP_TENSOR="1")
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "store").glob("rank-*/shard-*.safetensors")}
    assert all(after[p] == mtime for p, mtime in kept.items()), "the rerun kept every listed shard"
    assert len(after) > len(kept), "and wrote the missing ones"
    store = ActivationStore(tmp_path / "store")
    assert store.complete and store.missing == []
    assert torch.equal(_rows(store)[0], _rows(ActivationStore(full / "store"))[0])
    # training was interrupted on every rank after rank 0's step-10 checkpoint, then resumed from it
    assert json.loads((tmp_path / "interrupted.json").read_text()) == 10
    assert checkpoint_info(tmp_path / "ckpt.safetensors")["step"] == job.STORE_TRAIN.steps
    final = load_file(tmp_path / "store-rank0.safetensors")
    uninterrupted = load_file(full / "store-rank0.safetensors")
    for key, value in uninterrupted.items():
        torch.testing.assert_close(final[key], value, atol=1e-7, rtol=0)


def test_blocks_are_dealt_round_robin_and_an_empty_share_is_a_complete_part(tmp_path, monkeypatch):
    """Rank 1 of 2, simulated in one process: its rows are blocks 1, 3, 5, ... of the corpus (up to the token
    limit), and with a corpus of one block its part is complete and empty."""
    from mechscope.features.store import distributed as store_dist
    from mechscope.features.store import token_rows
    from mechscope.features.store.manifest import StoreSettings
    from mechscope.features.store.parts import merge, part_folder
    from mechscope.io import ModelInfo
    from mechscope.model.hooked import HookedModel

    hf, tok = tiny_model("llama")
    model = HookedModel(hf, tok)
    monkeypatch.setattr(store_dist.dist, "rank", lambda: 1)
    monkeypatch.setattr(store_dist.dist, "world_size", lambda: 2)
    monkeypatch.setattr(store_dist.dist, "is_main", lambda: False)
    all_rows = token_rows(model, job.TEXTS, seq_len=job.SEQ_LEN)  # 51 rows of 8
    settings = StoreSettings(sites=(job.SITE,), dtype="fp32", seq_len=job.SEQ_LEN, rows_per_shard=4, max_tokens=7 * 30)
    mine = torch.stack(list(store_dist._my_rows(model, job.TEXTS, settings)))
    expected = [i for i in range(30) if (i // 4) % 2 == 1]  # the limit: 30 rows of 7 tokens
    assert torch.equal(mine, all_rows[expected])

    one_block = [job.TEXTS[0]]  # 2 rows: one block (of up to 4), dealt to rank 0
    small = StoreSettings(sites=(job.SITE,), dtype="fp32", seq_len=job.SEQ_LEN, rows_per_shard=4)
    info = ModelInfo.of(model)
    top = Manifest(small, info, {})
    top.extra = {PARTS_KEY: {"world_size": 2}}
    (tmp_path / "s").mkdir()
    top.save(tmp_path / "s")
    store_dist._collect_part(model, [model.site(job.SITE)], one_block, tmp_path / "s", small, info, 8, False)
    part = Manifest.load(part_folder(tmp_path / "s", 1))
    assert part.complete and part.shards == []
    merged = merge(tmp_path / "s", top)
    assert merged.extra["missing"] == [{"rank": 0, "shards_done": 0, "rows_done": 0, "next_block": 0}]
