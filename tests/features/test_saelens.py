"""SAELens's on-disk format: folders built here by hand (nothing is downloaded) load with the encodings
SAELens's own definitions give, mechscope's SAEs export and load back exactly, and malformed folders
are clear errors. Against the real sae-lens package (in its own environment, run as a subprocess; skipped
with the reason where it is not there): SAEs it saves load here with equal encodings, and the reverse."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mechscope.errors import ConfigError, ShapeError
from mechscope.features import SAEConfig, SparseAutoencoder, load_sae, load_saelens, save_saelens
from mechscope.steer.clamp import check_sites
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("single_thread")
SITE = "blocks.1.hook_resid_pre"


def _saelens_encode(cfg: dict, w: dict, x: torch.Tensor) -> torch.Tensor:
    """SAELens's inference encode: relu/topk/jumprelu of (x - b_dec * apply_b_dec_to_input) @ W_enc + b_enc."""
    centred = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True) if "d_out" not in cfg else x
    pre = centred @ w["W_enc"] + w["b_enc"]
    arch = cfg["architecture"]
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "topk" or cfg.get("activation_fn_str") == "topk":
        top = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    if arch in ("jumprelu", "jumprelu_transcoder"):
        return torch.relu(pre) * (pre > w["threshold"])
    return torch.relu(pre)


def _folder(tmp_path: Path, cfg: dict, d_in: int = 16, d_sae: int = 40, seed: int = 0) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(seed)
    d_out = cfg.get("d_out", d_in)
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / 4,
        "b_enc": torch.randn(d_sae, generator=g) / 10,
        "W_dec": torch.randn(d_sae, d_out, generator=g) / 4,  # not unit norm, as SAELens leaves it
        "b_dec": torch.randn(d_out, generator=g) / 10,
    }
    if "jumprelu" in cfg["architecture"]:
        w["threshold"] = torch.rand(d_sae, generator=g) / 5
    if cfg["architecture"] == "skip_transcoder":
        w["W_skip"] = torch.randn(d_out, d_in, generator=g) / 4
    folder = tmp_path / cfg["architecture"]
    folder.mkdir()
    save_file(w, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, **cfg}))
    return folder, w


CONFIGS = [
    {"architecture": "standard", "metadata": {"hook_name": SITE}, "normalize_activations": "none"},  # v6
    {"architecture": "topk", "k": 5, "metadata": {"hook_name": SITE}},
    {"architecture": "jumprelu", "hook_name": SITE, "hook_layer": 1},  # v5: hook name at the top level
    {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 4}, "hook_name": SITE},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c["architecture"] + c.get("activation_fn_str", ""))
def test_a_saelens_folder_loads_with_saelens_encodings_and_exports_back_exactly(tmp_path, cfg):
    folder, w = _folder(tmp_path, cfg)
    sae = load_sae(folder)
    assert sae.config.site == SITE
    x = torch.randn(64, 16)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), _saelens_encode(cfg, w, x), rtol=0, atol=1e-6)
        recon = _saelens_encode(cfg, w, x) @ w["W_dec"] + w["b_dec"]
        torch.testing.assert_close(sae(x)[0], recon, rtol=1e-6, atol=1e-5)
    out = save_saelens(sae, tmp_path / "export")
    back = load_file(str(out / "sae_weights.safetensors"))
    assert back.keys() == w.keys() and all(torch.equal(back[k], w[k]) for k in w)
    exported = json.loads((out / "cfg.json").read_text())
    assert exported["metadata"]["hook_name"] == SITE and exported["d_sae"] == 40
    with torch.no_grad():
        torch.testing.assert_close(load_saelens(out).encode(x), sae.encode(x), rtol=0, atol=0)


def test_mechscope_saes_of_every_architecture_round_trip_through_the_format(tmp_path):
    x = torch.randn(32, 16)
    for activation, k in (("relu", None), ("topk", 3), ("batchtopk", 3), ("jumprelu", None)):
        sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=24, activation=activation, k=k, site=SITE), seed=4)
        if hasattr(sae, "threshold"):
            sae.threshold.data.uniform_(0.05, 0.3)
        back = load_saelens(save_saelens(sae, tmp_path / activation, model_name="tiny"))
        with torch.no_grad():  # batchtopk comes back as the jumprelu it is at inference
            torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=0, atol=0)
            torch.testing.assert_close(back(x)[0], sae(x)[0], rtol=0, atol=0)


def test_skip_transcoders_map_w_skip_and_the_output_hook(tmp_path):
    cfg = {"architecture": "skip_transcoder", "d_out": 12, "metadata": {"hook_name": "a", "hook_name_out": "b"}}
    folder, w = _folder(tmp_path, cfg)
    tc = load_saelens(folder)
    assert tc.config.skip and tc.config.out_site == "b" and tc.config.width_out == 12
    x = torch.randn(8, 16)
    expected = torch.relu(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"] + x @ w["W_skip"].T
    with torch.no_grad():
        torch.testing.assert_close(tc(x)[0], expected, rtol=1e-6, atol=1e-5)
    back = load_file(str(save_saelens(tc, tmp_path / "out") / "sae_weights.safetensors"))
    assert torch.equal(back["W_skip"], w["W_skip"])


def test_a_loaded_sae_attaches_at_its_canonical_site_and_a_wrong_width_is_refused(tmp_path):
    from mechscope.model.hooked import HookedModel

    model = HookedModel(*tiny_model("gpt2"))
    d = model.dims.d_model
    folder, _ = _folder(tmp_path, {"architecture": "standard", "metadata": {"hook_name": SITE}}, d_in=d)
    check_sites(model, load_sae(folder))  # attaches
    wrong, _ = _folder(tmp_path, {"architecture": "topk", "k": 2, "metadata": {"hook_name": SITE}}, d_in=d + 1)
    with pytest.raises(ShapeError, match=f"expects width {d + 1} at {SITE}, which has width {d}"):
        check_sites(model, load_sae(wrong))


def test_malformed_folders_are_clear_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cfg.json").write_text("{not json")
    with pytest.raises(ConfigError, match="line 1: malformed JSON"):
        load_saelens(bad)
    (bad / "cfg.json").write_text(json.dumps({"architecture": "standard", "d_in": "16"}))
    with pytest.raises(ConfigError, match=r"expected integer fields \['d_in', 'd_sae'\]"):
        load_saelens(bad)
    (bad / "cfg.json").write_text(json.dumps({"architecture": "gated", "d_in": 4, "d_sae": 8}))
    with pytest.raises(ConfigError, match="architecture 'gated' is not supported"):
        load_saelens(bad)
    (bad / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8, "normalize_activations": "layer_norm"}))
    with pytest.raises(ConfigError, match="normalize_activations 'layer_norm' is not supported"):
        load_saelens(bad)
    (bad / "cfg.json").write_text(json.dumps({"d_in": 4, "d_sae": 8}))
    with pytest.raises(ConfigError, match="no SAELens SAE weights file"):
        load_saelens(bad)
    save_file({"W_enc": torch.zeros(4, 8)}, str(bad / "sae_weights.safetensors"))
    with pytest.raises(ConfigError, match=r"SAE weights missing \['W_dec', 'b_dec', 'b_enc'\]"):
        load_saelens(bad)
    save_file(
        {"W_enc": torch.zeros(4, 9), "b_enc": torch.zeros(8), "W_dec": torch.zeros(8, 4), "b_dec": torch.zeros(4)},
        str(bad / "sae_weights.safetensors"),
    )
    with pytest.raises(ShapeError, match=r"W_enc has shape \(4, 9\), expected \(4, 8\)"):
        load_saelens(bad)


SAELENS_PYTHON = os.environ.get("MECHSCOPE_SAELENS_PYTHON") or (
    "/work/saelens-venv/bin/python" if Path("/work/saelens-venv/bin/python").is_file() else ""
)
needs_saelens = pytest.mark.skipif(
    not SAELENS_PYTHON,
    reason="the real sae-lens package lives in its own environment: set MECHSCOPE_SAELENS_PYTHON to a Python "
    "with sae-lens installed (see docs/features.md)",
)


def _saelens(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    side = Path(__file__).with_name("_saelens_side.py")
    done = subprocess.run([SAELENS_PYTHON, str(side), *args], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.slow
@needs_saelens
def test_saes_saved_by_the_real_saelens_load_with_equal_encodings(tmp_path):
    _saelens("save", str(tmp_path))
    theirs = load_file(str(tmp_path / "saelens_side.safetensors"))
    for name in ("standard", "topk", "jumprelu"):
        sae = load_sae(tmp_path / name)
        assert sae.config.site == SITE
        with torch.no_grad():
            torch.testing.assert_close(sae.encode(theirs["x"]), theirs[f"{name}.f"], rtol=0, atol=1e-6)
            torch.testing.assert_close(sae(theirs["x"])[0], theirs[f"{name}.recon"], rtol=1e-6, atol=1e-5)


@pytest.mark.slow
@needs_saelens
def test_saes_exported_by_mechscope_load_in_the_real_saelens_with_equal_encodings(tmp_path):
    x = torch.randn(64, 16)
    save_file({"x": x}, str(tmp_path / "inputs.safetensors"))
    ours = {}
    for activation, k in (("relu", None), ("topk", 3), ("batchtopk", 3), ("jumprelu", None)):
        sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=24, activation=activation, k=k, site=SITE), seed=5)
        if hasattr(sae, "threshold"):
            sae.threshold.data.uniform_(0.05, 0.3)
        save_saelens(sae, tmp_path / activation, model_name="tiny")
        ours[activation] = sae
    _saelens("encode", str(tmp_path))
    theirs = load_file(str(tmp_path / "saelens_side.safetensors"))
    for activation, sae in ours.items():
        with torch.no_grad():
            torch.testing.assert_close(theirs[f"{activation}.f"], sae.encode(x), rtol=0, atol=1e-6)
            torch.testing.assert_close(theirs[f"{activation}.recon"], sae(x)[0], rtol=1e-6, atol=1e-5)
        assert "".join(chr(c) for c in theirs[f"{activation}.hook"].tolist()) == SITE
