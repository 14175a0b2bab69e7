"""The float16 guard: a residual stream that leaves float16's range raises NumericsError naming where, on
every path into the model (forward, caching stopped early, partial runs, generation), and never fires on an
ordinary float16 run, in bfloat16, or in float32. On the device under test (``MECHSCOPE_TEST_DEVICE``: the
CPU here, CUDA in scripts/gpu_check.sh)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from mechscope.errors import NumericsError
from mechscope.model.hooked import HookedModel
from mechscope.model.partial import base_run, run_from
from tiny_models import tiny_model

DEVICE = os.environ.get("MECHSCOPE_TEST_DEVICE", "cpu")
HUGE = 1e6  # past float16's largest value (65504), well inside bfloat16's and float32's range


def _model(dtype: torch.dtype, family: str = "llama", **overrides: object) -> HookedModel:
    hf, tok = tiny_model(family, **overrides)
    return HookedModel(hf.to(device=DEVICE, dtype=dtype), tok)


def _blow_up(activation: torch.Tensor, _ctx: object) -> torch.Tensor:
    return activation * HUGE


def test_ordinary_float16_runs_pass_padded_batches_included() -> None:
    model = _model(torch.float16)
    logits = model(["a short one", "a somewhat longer prompt than the first"])
    assert logits.dtype == torch.float16
    assert torch.isfinite(logits).all()
    _, cache = model.run_with_cache(["a b c"], "blocks.0.hook_resid_post", stop_at_layer=1)
    assert "blocks.0.hook_resid_post" in cache


def test_overflow_raises_and_names_the_layer() -> None:
    model = _model(torch.float16)
    with model.hooks({"blocks.0.hook_resid_post": _blow_up}), pytest.raises(NumericsError) as info:
        model(["a b c"])
    message = str(info.value)
    assert "after layer 0 of 2" in message and "65504" in message and "bfloat16" in message


def test_overflow_in_the_last_layer_is_caught_at_the_final_norm() -> None:
    model = _model(torch.float16)
    with model.hooks({"blocks.1.hook_resid_post": _blow_up}), pytest.raises(NumericsError, match="the last layer"):
        model(["a b c"])


def test_overflow_in_the_embeddings() -> None:
    model = _model(torch.float16)
    with model.hooks({"hook_embed": _blow_up}), pytest.raises(NumericsError, match="the embeddings"):
        model(["a b c"])


def test_overflowing_weights_raise_without_any_hook() -> None:
    """The model's own activations (what Gemma-3-270M does in float16), not an intervention."""
    model = _model(torch.float16)
    with torch.no_grad():
        model.layer(0).mlp.down_proj.weight.fill_(6e4)
    with pytest.raises(NumericsError, match="after layer 0"):
        model(["a b c d e"])


def test_caching_stopped_early_is_checked() -> None:
    model = _model(torch.float16)
    with model.hooks({"blocks.0.hook_resid_post": _blow_up}), pytest.raises(NumericsError, match="after layer 0"):
        model.run_with_cache(["a b c"], "blocks.0.hook_resid_post", stop_at_layer=1)


def test_partial_runs_are_checked_with_and_without_a_stop_layer() -> None:
    model = _model(torch.float16, num_hidden_layers=3)
    run = base_run(model, ["a b c d"])
    with pytest.raises(NumericsError, match="entering layer 1"):
        run_from(model, run, run.resid_pre[1] * HUGE, layer=1)
    # stopped before layer 2: only the output captured at the stop can show the overflow
    hooks = {"blocks.1.hook_resid_post": _blow_up}
    with pytest.raises(NumericsError, match="entering layer 2"):
        run_from(model, run, run.resid_pre[1], layer=1, stop_layer=2, hooks=hooks)
    ok = run_from(model, run, run.resid_pre[1], layer=1)
    assert torch.isfinite(ok).all()


def test_generation_is_checked() -> None:
    model = _model(torch.float16)
    with model.hooks({"blocks.0.hook_resid_post": _blow_up}), pytest.raises(NumericsError):
        model.generate(["a b"], max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_wider_dtypes_never_raise(dtype: torch.dtype) -> None:
    model = _model(dtype)
    with model.hooks({"blocks.0.hook_resid_post": _blow_up}):
        logits = model(["a b c"])
    assert torch.isfinite(logits).all()


def test_an_error_leaves_the_next_run_clean() -> None:
    model = _model(torch.float16)
    with model.hooks({"blocks.0.hook_resid_post": _blow_up}), pytest.raises(NumericsError):
        model(["a b c"])
    assert torch.isfinite(model(["a b c"])).all()


def test_a_guard_leaves_no_hooks_and_nests() -> None:
    model = _model(torch.float16)
    with model.guard_float16() as outer, model.guard_float16() as inner:
        assert outer is not None and inner is outer
        model(["a b c"])
    assert not any(m._forward_pre_hooks or m._forward_pre_hooks_with_kwargs for m in model.hf_model.modules())
    assert _model(torch.bfloat16).guard_float16().__enter__() is None


def test_direct_hf_calls_are_guarded_inside_the_block() -> None:
    model = _model(torch.float16)
    batch = model.prepare_inputs(["a b c"])
    with model.hooks({"blocks.0.hook_resid_post": _blow_up}):
        model.hf_model(**batch)  # unguarded: NaN logits, as HF returns them
        with pytest.raises(NumericsError), model.guard_float16():
            model.hf_model(**batch)


def test_copies_of_a_model_are_guarded() -> None:
    model = _model(torch.float16)
    copied = HookedModel(copy.deepcopy(model.hf_model), model.tokenizer)
    with torch.no_grad():
        copied.layer(0).mlp.down_proj.weight.fill_(6e4)
    with pytest.raises(NumericsError):
        copied(["a b c d e"])
    assert torch.isfinite(model(["a b c d e"])).all()
