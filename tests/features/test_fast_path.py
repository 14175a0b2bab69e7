"""The fast training path equals the plain dense computation: the encoder's sparse-gradient backward
(:mod:`mechscope.features.architectures.sparse_grad`) and the sparse decode give the same loss and the
same gradients as ``pre = (x - b_dec) W_enc + b_enc``, a dense code, ``f W_dec + b_dec`` under plain
autograd, for every architecture, SAEs and (skip-)transcoders, with and without an input gradient."""

from __future__ import annotations

import pytest
import torch

from mechscope.features import SAEConfig, SAETrainConfig, SparseAutoencoder
from mechscope.features.architectures import SparseCode, sparse_grad

pytestmark = pytest.mark.usefixtures("single_thread")

TRAIN = SAETrainConfig(steps=1, l1_coefficient=1.0, l0_coefficient=0.3)


def _configs() -> list[SAEConfig]:
    out = []
    for activation, k in (("topk", 3), ("batchtopk", 3), ("relu", None), ("jumprelu", None)):
        out.append(SAEConfig(d_in=12, d_sae=40, activation=activation, k=k))
        out.append(SAEConfig(d_in=12, d_sae=40, activation=activation, k=k, d_out=9, out_site="b", skip=True))
    return out


def _sae(config: SAEConfig) -> SparseAutoencoder:
    sae = SparseAutoencoder(config, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # move every parameter off its initial value (zero biases, tied weights)
        for name, p in sae.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g) + (0.05 if name == "threshold" else 0.0))
    return sae


def _loss_fast(sae: SparseAutoencoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training step's loss as train_sae computes it."""
    arch = sae.architecture
    pre = sae.pre_activations(x)
    code = arch.train_encode(sae, pre, TRAIN)
    recon = sae.decode_sparse(code, x) if isinstance(code, SparseCode) else sae.decode(code, x)
    loss = (recon - y).pow(2).sum(-1).mean()
    penalty = arch.penalty(sae, pre, code, TRAIN)
    return loss if penalty is None else loss + penalty


def _loss_reference(sae: SparseAutoencoder, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same loss, written densely with plain autograd (no custom backward, no sparse decode)."""
    arch, cfg = sae.architecture, sae.config
    pre = (x - sae.b_dec if cfg.centre_input else x) @ sae.W_enc + sae.b_enc
    code = arch.train_encode(sae, pre, TRAIN)
    f = code.dense(cfg.d_sae) if isinstance(code, SparseCode) else code
    recon = f @ sae.W_dec + sae.b_dec + (x @ sae.W_skip if cfg.skip else 0.0)
    loss = (recon - y).pow(2).sum(-1).mean()
    penalty = arch.penalty(sae, pre, code, TRAIN)
    return loss if penalty is None else loss + penalty


@pytest.mark.parametrize("config", _configs(), ids=lambda c: f"{c.activation}{'-skip' if c.skip else ''}")
@pytest.mark.parametrize("input_grad", [False, True])
def test_the_fast_path_equals_the_dense_reference(config, input_grad):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, config.d_in, generator=g)
    y = x if not config.transcoder else torch.randn(64, config.width_out, generator=g)
    results = []
    for loss_of in (_loss_fast, _loss_reference):
        sae = _sae(config)
        xi = x.clone().requires_grad_(input_grad)
        loss = loss_of(sae, xi, y if config.transcoder else xi.detach())
        loss.backward()
        grads = {n: p.grad for n, p in sae.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, xi.grad))
    (fast, fast_grads, fast_x), (ref, ref_grads, ref_x) = results
    assert torch.allclose(fast, ref, rtol=1e-5, atol=1e-6), (fast, ref)
    assert set(fast_grads) == set(ref_grads) and {"W_enc", "b_enc", "W_dec", "b_dec"} <= set(ref_grads)
    for name, grad in ref_grads.items():
        assert torch.allclose(fast_grads[name], grad, rtol=1e-4, atol=1e-5), name
    if input_grad:
        assert fast_x is not None and torch.allclose(fast_x, ref_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_a_top_k_gradient_reaches_the_encoder_sparse(activation, monkeypatch):
    """The top-k family's encoder backward gets the gradient of the selected pre-activations only, as a
    sparse tensor (k per token on average), and multiplies it as compressed sparse rows."""
    seen = []
    real = sparse_grad._sparse_t_mm

    def spy(rows, cols, values, xc, d_sae):
        seen.append(values.numel())
        return real(rows, cols, values, xc, d_sae)

    monkeypatch.setattr(sparse_grad, "_sparse_t_mm", spy)
    sae = _sae(SAEConfig(d_in=12, d_sae=400, activation=activation, k=4))
    x = torch.randn(32, 12)
    _loss_fast(sae, x, x).backward()
    assert seen == [32 * 4]


def test_the_auxiliary_loss_through_the_fast_path_equals_the_dense_reference():
    from mechscope.features.train import _aux_loss

    config = SAEConfig(d_in=12, d_sae=40, activation="topk", k=3)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(6))
    error = torch.randn(64, 12, generator=torch.Generator().manual_seed(7))
    grads = []
    for fast in (True, False):
        sae = _sae(config)
        pre = sae.pre_activations(x) if fast else (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        loss = _aux_loss(sae, pre, dead, error)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in sae.named_parameters()}))
    (fast_loss, fast_grads), (ref_loss, ref_grads) = grads
    assert torch.allclose(fast_loss, ref_loss)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.allclose(fast_grads[name], ref_grads[name], rtol=1e-4, atol=1e-5), name
    assert bool((fast_grads["W_enc"][:, ~dead] == 0).all())  # only dead features learn from AuxK


def test_the_batch_selection_equals_a_top_n_over_the_whole_batch():
    """BatchTopK searches every token's top 4k entries first: exact unless a token fills all its candidates,
    when the whole batch is searched. Both branches against a plain top-n of the flattened batch."""
    from mechscope.features.architectures.batchtopk import batch_top

    gen = torch.Generator().manual_seed(0)
    tokens, d_sae, k = 64, 256, 8
    spread = torch.relu(torch.randn(tokens, d_sae, generator=gen))
    dominated = spread.clone()
    dominated[3] += 10.0  # token 3 alone holds the top 256 entries: more than its 32 candidates
    sparse = torch.relu(torch.randn(tokens, d_sae, generator=gen) - 2.7)  # fewer positives than k * tokens
    for name, acts in {"spread": spread, "dominated": dominated, "sparse": sparse}.items():
        token, feature = batch_top(acts, k * tokens)
        flat = token * d_sae + feature
        assert torch.equal(flat, flat.sort().values), f"{name}: sorted by token, then feature"
        want = acts.flatten().topk(k * tokens).values
        got = acts[token, feature]
        torch.testing.assert_close(got.sort().values, want.sort().values, rtol=0, atol=0, msg=name)
        if name != "sparse":  # no ties: the very same entries
            assert torch.equal(flat, acts.flatten().topk(k * tokens).indices.sort().values), name
    assert int((batch_top(dominated, k * tokens)[0] == 3).sum()) == d_sae


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_the_sparse_backward_raises_no_torch_construction_notice(activation, monkeypatch):
    """torch 2.11 warns "Sparse invariant checks are implicitly disabled" when a sparse tensor is built with
    ``check_invariants=False`` (and every release calls CSR "beta"); the gradients here are valid by
    construction, so the backward builds them without either notice reaching the user (on 2.11 the first
    training step raised it from mechscope, an error under this suite's warning filter). The notices are
    simulated, as 2.11 raises them, so the test runs on any torch."""
    import warnings

    def noisy(real, *notices):
        def build(*args, **kwargs):
            for notice in notices:
                warnings.warn(notice, UserWarning, stacklevel=2)
            return real(*args, **kwargs)

        return build

    implicit = "Sparse invariant checks are implicitly disabled. Memory errors (e.g. SEGFAULT) will occur"
    beta = "Sparse CSR tensor support is in beta state. If you miss a functionality ..."
    monkeypatch.setattr(torch, "sparse_coo_tensor", noisy(torch.sparse_coo_tensor, implicit))
    monkeypatch.setattr(torch, "sparse_csr_tensor", noisy(torch.sparse_csr_tensor, implicit, beta))
    sae = _sae(SAEConfig(d_in=12, d_sae=40, activation=activation, k=3))
    x = torch.randn(32, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loss_fast(sae, x, x).backward()
    assert sae.W_enc.grad is not None and bool(sae.W_enc.grad.abs().sum() > 0)
