"""Data parallelism over torch.distributed: the helpers by definition in one process, and a real 2-rank
gloo job (torchrun) whose gathered sweeps and collected stores equal the single-process ones."""

from __future__ import annotations

import subprocess
from pathlib import Path

import dist_job
import pytest
import torch
from torchrun_job import torchrun

from mechscope.errors import ConfigError, ShapeError
from mechscope.features.store import ActivationStore, collect_store
from mechscope.locate import PatchResult, activation_patch, attribution_patch
from mechscope.model import distributed as dist
from mechscope.model.loading import load_model
from mechscope.results import Result

pytestmark = pytest.mark.usefixtures("single_thread")

JOB = Path(__file__).with_name("dist_job.py")


# The helpers, by definition ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [0, 1, 5, 7, 64])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_row_once_in_order(n, world):
    bounds = [dist.shard_bounds(n, r, world) for r in range(world)]
    rows = [i for start, stop in bounds for i in range(start, stop)]
    assert rows == list(range(n))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_one_process_is_a_world_of_one():
    assert not dist.is_distributed() and dist.rank() == 0 and dist.world_size() == 1 and dist.is_main()
    rows = torch.arange(10).reshape(5, 2)
    assert dist.shard(rows) is not None and torch.equal(dist.shard(rows), rows)
    assert torch.equal(dist.gather_rows(rows), rows)
    assert list(dist.shard_stream(range(4))) == [0, 1, 2, 3]
    result = Result(tensors={"x": torch.ones(2)}, axes={"x": ("unit",)})
    assert dist.map_prompts(lambda c: result, rows) is result
    with dist.process_group():  # no WORLD_SIZE: nothing initialised
        assert not dist.is_distributed()


def test_bad_input():
    rows = torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ShapeError, match="same number of prompts"):
        dist.map_prompts(lambda a, b: None, rows, rows[:3])
    with pytest.raises(ConfigError, match="combine"):
        dist.map_prompts(lambda a: None, rows, combine="sum")
    with pytest.raises(ConfigError, match="Result"):
        dist.map_prompts(lambda a: a, rows)
    with pytest.raises(ConfigError, match="one prompt cannot be split"):
        dist.shard_inputs("a single prompt")
    with pytest.raises(ShapeError, match="batch size"):
        dist.shard_inputs({"input_ids": rows, "attention_mask": rows[:2]})
    with pytest.raises(ConfigError, match="rank"):
        dist.shard_bounds(4, 2, 2)


def test_process_group_needs_torchrun_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match="torchrun"), dist.process_group():
        pass


# Two ranks with torchrun (gloo) -----------------------------------------------------------------------
def _torchrun(folder: Path, out: Path, **env_extra: str) -> subprocess.CompletedProcess[str]:
    return torchrun(JOB, folder, out, **env_extra)


@pytest.fixture(scope="module")
def two_rank_run(model_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    proc = _torchrun(model_folder, out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_model(model_folder), out


def test_two_rank_sweeps_equal_the_single_process_sweeps(two_rank_run):
    model, out = two_rank_run
    clean, corrupt, answers = dist_job.prompts()
    metric = dist_job.metric(answers)
    gathered = Result.load(out / "patch.safetensors")
    assert isinstance(gathered, PatchResult) and gathered.config["world_size"] == 2
    single = activation_patch(model, clean, corrupt, "heads", metric)
    for name in single.tensors:  # equal up to float reassociation of the batch mean (3 + 2 rows)
        torch.testing.assert_close(gathered[name], single[name], atol=1e-6, rtol=1e-5)
    gathered_atp = Result.load(out / "atp.safetensors")
    single_atp = attribution_patch(model, clean, corrupt, metric)
    for name in single_atp.tensors:
        torch.testing.assert_close(gathered_atp[name], single_atp[name], atol=1e-6, rtol=1e-5)
    rows = Result.load(out / "rows.safetensors")
    _, cache = model.run_with_cache(clean, ["blocks.1.hook_resid_post"])
    torch.testing.assert_close(rows["acts"], cache["blocks.1.hook_resid_post"])


def test_two_rank_collection_equals_one_rank_collection_as_a_set_of_rows(two_rank_run, tmp_path):
    """(A rank lost mid-collection, and the rerun: tests/scale/test_distributed_features.py.)"""
    model, out = two_rank_run
    single = collect_store(
        model, dist_job.SITE, dist_job.TEXTS, tmp_path / "one", dtype="fp32", seq_len=dist_job.SEQ_LEN, rows_per_shard=4
    )
    store = ActivationStore(out / "store")
    assert store.complete and store.n_tokens == single.n_tokens

    def sorted_rows(one):
        tokens = torch.cat(list(one.tokens()))
        acts = one.activations(dist_job.SITE).reshape(tokens.shape[0], -1)
        order = sorted(range(tokens.shape[0]), key=lambda i: tokens[i].tolist())
        return tokens[order], acts[order]

    tokens, acts = sorted_rows(store)
    ref_tokens, ref_acts = sorted_rows(single)
    assert torch.equal(tokens, ref_tokens), "the ranks together hold exactly the corpus rows, each once"
    torch.testing.assert_close(acts, ref_acts, atol=1e-6, rtol=1e-5)
