"""Models spread by HF's device_map through accelerate (CPU and disk offload on this machine): hooks, caches,
interventions, weight views, partial runs, batched patching, AtP and gradients equal the plain model's."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, MechscopeError
from mechscope.locate import activation_patch, attribution_patch
from mechscope.locate.metrics import logit_diff
from mechscope.model import offload
from mechscope.model.loading import load_model
from mechscope.steer import mean_difference, orthogonalize, steer, zero_ablation
from mechscope.steer.editing import EditError, EditRequest, ROMEConfig, rome
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")

GEN = torch.Generator().manual_seed(0)
CLEAN = torch.randint(4, 100, (3, 7), generator=GEN)
CORRUPT = CLEAN.clone()
CORRUPT[:, 2] = torch.randint(4, 100, (3,), generator=GEN)
POS = ["the cat sat on the mat", "a cat ran to the mat"]
NEG = ["we read a book today", "they walk in the park"]


def metric(logits):
    return logit_diff(logits, [5, 6, 7], [9, 10, 11])


def _maps(family):
    """name -> device_map: one layer on disk; the embedding (the first module) on disk too; and 'auto'
    with a CPU budget too small for the model, so accelerate decides what goes to disk."""
    if family == "gpt2":
        rest = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.ln_f": "cpu", "lm_head": "cpu"}
        layers = "transformer.h"
    else:
        rest = {"model.embed_tokens": "cpu", "model.norm": "cpu", "lm_head": "cpu", "model.rotary_emb": "cpu"}
        layers = "model.layers"
    layer_on_disk = {**rest, f"{layers}.0": "cpu", f"{layers}.1": "disk"}
    embed = "transformer.wte" if family == "gpt2" else "model.embed_tokens"
    embed_on_disk = {**layer_on_disk, embed: "disk", f"{layers}.0": "disk"}
    if family == "gpt2":  # tied embeddings are one tensor: the head goes where the embedding goes
        embed_on_disk["lm_head"] = "disk"
    maps = {"layer_on_disk": layer_on_disk, "embed_on_disk": embed_on_disk, "auto": "auto"}
    if torch.cuda.is_available():  # the embedding and first layer on the GPU, then CPU, then disk
        on_gpu = (embed, f"{layers}.0", *(("lm_head",) if family == "gpt2" else ()))  # gpt2's head is tied
        maps["gpu_cpu_disk"] = {k: 0 if k in on_gpu else v for k, v in layer_on_disk.items()}
    return maps


CUDA = torch.cuda.is_available()
NAMES = ("layer_on_disk", "embed_on_disk", "auto", *(("gpu_cpu_disk",) if CUDA else ()))
CASES = [(family, name) for family in ("llama", "gpt2") for name in NAMES]
#: equal up to summation order: exact on one CPU; a GPU's kernels round differently from the CPU's
ATOL, RTOL = (1e-4, 1e-4) if CUDA else (1e-6, 1e-5)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for family in ("llama", "gpt2"):
        hf, tok = tiny_model(family)
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        tok.save_pretrained(folder)
        out[family] = folder
    return out


@pytest.fixture(scope="module")
def pair(folders, tmp_path_factory):
    made = {}

    def get(family, name):
        if (family, name) not in made:
            plain = load_model(folders[family])
            device_map = _maps(family)[name]
            # 70 % of the weights' bytes, so that "auto" splits the model between CPU and disk (a fixed 40 KB put
            # all of GPT-2 on disk with accelerate 1.15, and older releases refused it)
            weights = sum(f.stat().st_size for f in folders[family].glob("*.safetensors"))
            budget = {"cpu": int(0.7 * weights), **({0: "20KB"} if CUDA else {})}
            extra = {"max_memory": budget} if device_map == "auto" else {}
            spread = load_model(
                folders[family], device_map=device_map, offload_folder=tmp_path_factory.mktemp("offload"), **extra
            )
            assert offload.offloaded_names(spread.hf_model), "the case really offloads weights"
            made[family, name] = plain, spread
        return made[family, name]

    return get


def _same(a, b, what):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(("family", "name"), CASES)
def test_forward_cache_and_fingerprint(pair, family, name):
    plain, spread = pair(family, name)
    assert spread.fingerprint() == plain.fingerprint(), "offloaded weights are read for the fingerprint"
    _same(spread(CLEAN), plain(CLEAN), "logits")
    logits_a, a = spread.run_with_cache(CLEAN, device="cpu")
    logits_b, b = plain.run_with_cache(CLEAN)
    _same(logits_a, logits_b, "cached logits")
    for site in plain.site_names:
        if site == "logits":
            continue
        assert a[site].device.type == "cpu", "caches go to the chosen device"
        _same(a[site], b[site], site)
    _, part_a = spread.run_with_cache(CLEAN, ["blocks.0.hook_resid_post"], stop_at_layer=1)
    _, part_b = plain.run_with_cache(CLEAN, ["blocks.0.hook_resid_post"], stop_at_layer=1)
    _same(part_a["blocks.0.hook_resid_post"], part_b["blocks.0.hook_resid_post"], "partial run")


@pytest.mark.parametrize(("family", "name"), CASES)
def test_weight_views_read_offloaded_weights(pair, family, name):
    plain, spread = pair(family, name)
    for view in ("W_Q", "W_K", "W_V", "W_O", "b_O", "W_in", "W_out", "W_E", "W_U", "b_U"):
        got, want = getattr(spread.weights, view), getattr(plain.weights, view)
        assert got.device.type != "meta", view
        _same(got, want, view)


@pytest.mark.parametrize(("family", "name"), CASES)
def test_patching_attribution_gradients_and_interventions(pair, family, name):
    plain, spread = pair(family, name)
    got, want = (activation_patch(m, CLEAN, CORRUPT, "heads", metric) for m in (spread, plain))
    for key in want.tensors:
        _same(got[key], want[key], f"head patching {key}")
    got, want = (attribution_patch(m, CLEAN, CORRUPT, metric) for m in (spread, plain))
    for key in want.tensors:
        _same(got[key], want[key], f"AtP {key}")
    sites = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    got_g, want_g = (m.run_with_grads(CLEAN, lambda x: x[:, -1, 5].sum(), sites) for m in (spread, plain))
    for site in sites:
        _same(got_g.gradients[site], want_g.gradients[site], f"gradient at {site}")
    vector_a = mean_difference(spread, POS, NEG, layers=[1])
    vector_b = mean_difference(plain, POS, NEG, layers=[1])
    _same(vector_a.directions, vector_b.directions, "steering vector")
    with steer(spread, vector_a, 3.0), zero_ablation(spread, "blocks.0.attn.hook_z", heads=[1]):
        steered_a = spread(CLEAN)
    with steer(plain, vector_b, 3.0), zero_ablation(plain, "blocks.0.attn.hook_z", heads=[1]):
        steered_b = plain(CLEAN)
    _same(steered_a, steered_b, "steered and ablated logits")


def test_weight_edits_on_offloaded_weights_are_refused(pair):
    """Edits cannot be written into accelerate's offload store: a clear error, and the model unchanged."""
    _, spread = pair("llama", "embed_on_disk")  # layer 0 on disk
    before = spread(CLEAN)
    direction = torch.randn(spread.dims.d_model, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ConfigError, match="offloaded"):
        orthogonalize(spread, direction, inplace=True)
    request = EditRequest(prompt="The capital of {}", subject="France", target=" Rome")
    with pytest.raises(EditError, match="offloaded"):
        rome(spread, request, ROMEConfig(layer=0), mom2=torch.eye(spread.dims.d_mlp))
    torch.testing.assert_close(spread(CLEAN), before)


def test_a_device_map_that_leaves_a_layer_nowhere_is_refused(folders):
    device_map = _maps("llama")["layer_on_disk"]
    del device_map["model.layers.1"]
    with pytest.raises(ConfigError, match=r"nowhere.*model\.layers\.1"):
        load_model(folders["llama"], device_map=device_map)


def test_a_budget_that_fits_no_module_runs_the_model_from_disk(folders, tmp_path):
    """A CPU budget of one byte leaves every module on disk; the model still runs, with equal logits."""
    spread = load_model(folders["llama"], device_map="auto", max_memory={"cpu": 1}, offload_folder=tmp_path)
    names = offload.offloaded_names(spread.hf_model)
    assert len(names) == sum(1 for _ in spread.hf_model.parameters())  # every weight is on disk
    _same(spread(CLEAN), load_model(folders["llama"])(CLEAN), "logits from disk")


@pytest.mark.parametrize(("installed", "says"), [("1.14.0", "1.14.0 is installed"), (None, "needs accelerate:")])
def test_device_map_refuses_an_accelerate_that_cannot_offload_every_model(folders, monkeypatch, installed, says):
    """accelerate 1.1-1.14 crash with a bare KeyError on a disk-offloaded tied embedding (GPT-2 here) and
    refuse a budget that sends every module to disk; device_map asks for what works instead."""
    from importlib import metadata

    real = metadata.version

    def version(name):
        if name != "accelerate":
            return real(name)
        if installed is None:
            raise metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(metadata, "version", version)
    with pytest.raises(ConfigError, match=rf"{says}.*accelerate>=1\.15"):
        load_model(folders["gpt2"], device_map=_maps("gpt2")["embed_on_disk"])
    assert load_model(folders["gpt2"]).dims.n_layers == 2  # without device_map accelerate is not needed


def test_tied_embeddings_placed_apart_are_refused(folders):
    device_map = {**_maps("gpt2")["layer_on_disk"], "transformer.wte": "disk"}
    with pytest.raises(ConfigError, match="ties its input and output embeddings"):
        load_model(folders["gpt2"], device_map=device_map)


def test_device_map_bad_entries_are_refused(folders):
    with pytest.raises(ConfigError, match="does not have"):
        load_model(folders["llama"], device_map={**_maps("llama")["layer_on_disk"], "model.layers.7": "cpu"})
    with pytest.raises(ConfigError, match="must be devices"):
        load_model(folders["llama"], device_map={"": "gpu-please"})
    with pytest.raises(ConfigError, match="device_map must be"):
        load_model(folders["llama"], device_map="everywhere")
    with pytest.raises(ConfigError, match="apply with device_map"):
        load_model(folders["llama"], max_memory={"cpu": "1GiB"})


def test_offload_in_bf16_equals_the_plain_bf16_model(folders, tmp_path):
    plain = load_model(folders["llama"], dtype="bf16")
    spread = load_model(
        folders["llama"], dtype="bf16", device_map=_maps("llama")["layer_on_disk"], offload_folder=tmp_path
    )
    assert spread.dtype == torch.bfloat16 and offload.offloaded_names(spread.hf_model)
    assert spread.fingerprint() == plain.fingerprint()
    _, a = spread.run_with_cache(CLEAN, ["blocks.1.attn.hook_result", "blocks.1.hook_resid_post"])
    _, b = plain.run_with_cache(CLEAN, ["blocks.1.attn.hook_result", "blocks.1.hook_resid_post"])
    for site in ("blocks.1.attn.hook_result", "blocks.1.hook_resid_post"):
        assert a[site].dtype == torch.bfloat16
        _same(a[site].float(), b[site].float(), site)
    got, want = (activation_patch(m, CLEAN, CORRUPT, "heads", metric) for m in (spread, plain))
    _same(got["metric"], want["metric"], "bf16 head patching")


@pytest.mark.parametrize("name", NAMES)
def test_the_float16_guard_watches_offloaded_and_spread_layers(folders, tmp_path, name):
    from mechscope.errors import NumericsError

    spread = load_model(folders["llama"], dtype="fp16", device_map=_maps("llama")[name], offload_folder=tmp_path)
    plain = load_model(folders["llama"], dtype="fp16")
    _same(spread(CLEAN).float(), plain(CLEAN).float(), f"fp16 logits ({name})")

    def blow_up(activation, _ctx):
        return activation * 1e6  # past float16's 65504

    for layer in (0, 1):  # layer 1 sits on disk in the named maps; "auto" puts what it likes there
        with spread.hooks({f"blocks.{layer}.hook_resid_post": blow_up}), pytest.raises(NumericsError) as info:
            spread(CLEAN)
        where = "the last layer" if layer == 1 else "after layer 0"
        assert where in str(info.value), str(info.value)


def test_the_temporary_offload_folder_goes_with_the_model(folders, tmp_path, monkeypatch):
    """Without offload_folder, load_model makes one and removes it when the model is collected (or at exit),
    also when the load fails; a folder the caller named is left alone."""
    import gc
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    device_map = _maps("llama")["layer_on_disk"]
    spread = load_model(folders["llama"], device_map=device_map)
    made = list(tmp_path.glob("mechscope-offload-*"))
    assert len(made) == 1 and made[0].is_dir()
    assert spread(CLEAN).shape[:2] == CLEAN.shape, "the model runs while its folder exists"
    del spread
    gc.collect()
    assert not made[0].exists(), "collected with its model"

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in folders["llama"].iterdir():
        (broken / f.name).write_bytes(f.read_bytes()[:200] if f.suffix == ".safetensors" else f.read_bytes())
    with pytest.raises(MechscopeError, match="could not load the weights"):
        load_model(broken, device_map=device_map)
    assert not list(tmp_path.glob("mechscope-offload-*")), "removed when the load fails"

    mine = tmp_path / "mine"
    mine.mkdir()
    kept = load_model(folders["llama"], device_map=device_map, offload_folder=mine)
    del kept
    gc.collect()
    assert mine.is_dir(), "the caller's folder stays"
