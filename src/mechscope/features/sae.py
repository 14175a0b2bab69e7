"""A sparse autoencoder over one model site: ``f = act(W_enc^T (x - b_dec) + b_enc)``, ``x_hat = W_dec^T f + b_dec``.

With ``out_site`` set it is a *transcoder* (Dunefsky et al. 2024): it reads one site (an MLP's input,
``blocks.L.ln2.hook_normalized``) and reconstructs another (that MLP's output, ``blocks.L.hook_mlp_out``),
``f = act(W_enc^T x + b_enc)``, ``y_hat = W_dec^T f + b_dec``: a sparse, interpretable replacement of the
MLP rather than of a state.

Two sparsity mechanisms, the two most used in published SAE suites: ``relu`` (an L1 penalty on the
feature activations weighted by their decoder norms, Bricken et al. 2023) and ``topk`` (keep the `k`
largest pre-activations per token, Gao et al. 2024: sparsity set exactly, no penalty to tune).
Decoder rows are kept at unit norm, so a feature's activation is its coefficient along its direction.
Saved as safetensors weights plus a JSON config beside them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.errors import ConfigError, ShapeError

ACTIVATIONS = ("relu", "topk")


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Shape and sparsity mechanism of a :class:`SparseAutoencoder`.

    Attributes:
        d_in: width of the site's activations (``d_model`` for the residual stream).
        d_sae: number of features (the dictionary size).
        activation: ``relu`` (sparsity from the L1 penalty while training) or ``topk``.
        k: active features per token for ``topk``.
        site: the canonical site the SAE reads (``blocks.1.hook_resid_post``).
        d_out: width of the reconstructed site for a transcoder (None: an SAE, ``d_out = d_in``).
        out_site: the site a transcoder reconstructs ("" for an SAE: it reconstructs `site`).
    """

    d_in: int
    d_sae: int
    activation: str = "relu"
    k: int | None = None
    site: str = ""
    d_out: int | None = None
    out_site: str = ""

    @property
    def transcoder(self) -> bool:
        """Whether this reconstructs another site than it reads."""
        return self.d_out is not None or bool(self.out_site)

    @property
    def width_out(self) -> int:
        """Width of the reconstruction."""
        return self.d_in if self.d_out is None else self.d_out

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise ConfigError(f"expected positive d_in and d_sae, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"expected activation one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if self.activation == "topk" and (self.k is None or not 1 <= self.k <= self.d_sae):
            raise ConfigError(f"activation 'topk' needs 1 <= k <= d_sae={self.d_sae}, got k={self.k}")
        if self.activation == "relu" and self.k is not None:
            raise ConfigError(f"k is only used by activation 'topk', got k={self.k} with 'relu'")
        if self.transcoder and (self.d_out is None or self.d_out < 1):
            raise ConfigError(f"a transcoder (out_site={self.out_site!r}) needs a positive d_out, got {self.d_out}")


class SparseAutoencoder(nn.Module):
    """Encoder, decoder and biases of one SAE (fp32 parameters; inputs are cast to them)."""

    def __init__(self, config: SAEConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        w_dec = torch.randn(config.d_sae, config.width_out, generator=gen)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)  # [d_sae, d_out], unit rows
        if config.transcoder:
            w_enc = torch.randn(config.d_in, config.d_sae, generator=gen) / config.d_in**0.5
        else:
            w_enc = w_dec.T.clone()  # tied at initialisation
        self.W_enc = nn.Parameter(w_enc)  # [d_in, d_sae]
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(config.width_out))

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.config.d_in:
            raise ShapeError(
                f"expected activations with last dimension d_in={self.config.d_in}"
                + (f" (site {self.config.site})" if self.config.site else "")
                + f", got shape {tuple(x.shape)}"
            )

    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        self._check(x)
        x = x.to(self.W_enc.dtype)
        return (x if self.config.transcoder else x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations of `x` (non-negative; at most `k` non-zero per token for ``topk``)."""
        pre = self.pre_activations(x)
        if self.config.activation == "relu":
            return torch.relu(pre)
        assert self.config.k is not None
        top = pre.topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """The reconstruction ``f @ W_dec + b_dec``."""
        if f.shape[-1] != self.config.d_sae:
            raise ShapeError(
                f"expected feature activations with last dimension {self.config.d_sae}, got {tuple(f.shape)}"
            )
        return f @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_in"]) -> tuple[Tensor, Tensor]:
        """``(reconstruction [..., d_out], feature activations)`` of `x`."""
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale decoder rows to unit norm (and the encoder columns inversely: same reconstruction)."""
        norms = self.W_dec.norm(dim=-1).clamp(min=1e-8)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)

    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors) and ``path`` with suffix ``.json`` (the config); returns `path`."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path))
        path.with_suffix(".json").write_text(json.dumps({"kind": "sae", "config": asdict(self.config)}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> SparseAutoencoder:
        """An SAE saved by :meth:`save`."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not path.is_file() or not meta_path.is_file():
            raise ConfigError(f"expected an SAE at {path} with its config {meta_path}; one of them is missing")
        meta = json.loads(meta_path.read_text())
        if meta.get("kind") != "sae":
            raise ConfigError(f"expected an SAE config (kind 'sae') at {meta_path}, got kind {meta.get('kind')!r}")
        sae = cls(SAEConfig(**meta["config"]))
        sae.load_state_dict(load_file(str(path)))
        return sae


__all__ = ["ACTIVATIONS", "SAEConfig", "SparseAutoencoder"]
