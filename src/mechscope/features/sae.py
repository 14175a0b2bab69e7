"""A sparse autoencoder over one model site: ``f = act(W_enc^T (x - b_dec) + b_enc)``, ``x_hat = W_dec^T f + b_dec``.

``act`` is one of the registered architectures (:mod:`mechscope.features.architectures`): ``relu``
(L1 penalty), ``topk``, ``batchtopk`` or ``jumprelu``. With ``out_site`` set it is a *transcoder*
(Dunefsky et al. 2024): it reads one site (an MLP's input) and reconstructs another (that MLP's
output), ``f = act(W_enc^T x + b_enc)``, ``y_hat = W_dec^T f + b_dec``; with ``skip=True`` a
*skip-transcoder* (Paulo et al. 2025) adds a dense linear path ``x W_skip`` to the reconstruction.

Decoder rows are kept at unit norm, so a feature's activation is its coefficient along its direction.
Saved as one safetensors file in mechscope's file envelope (weights + config, and the model it was
trained on when known); files of the older layout (weights + a sidecar ``.json``) still load.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.errors import ConfigError, ShapeError
from mechscope.features.architectures import SparseCode, architectures, get_architecture
from mechscope.features.architectures.sparse_grad import Encode
from mechscope.io import (
    Envelope,
    FileSchema,
    ModelInfo,
    check_header,
    read_json,
    read_safetensors,
    register_schema,
    write_envelope,
)
from mechscope.results import ModelMismatchError


def _sae_v1_to_v2(header: dict[str, str]) -> dict[str, str]:
    """Schema 1: plain safetensors weights with the config in a sidecar ``.json`` ({kind, config})."""
    sidecar = json.loads(header["sidecar"])
    if sidecar.get("kind") != "sae" or not isinstance(sidecar.get("config"), dict):
        raise ValueError(f"the sidecar is not an SAE config (kind {sidecar.get('kind')!r})")
    return {
        "format": header["format"],
        "kind": "sae",
        "body": json.dumps({"config": sidecar["config"]}),
        "model": "null",
    }


SAE_SCHEMA = register_schema(FileSchema("sae", 2, "sparse autoencoder", {1: _sae_v1_to_v2}))


@dataclass(frozen=True, kw_only=True)
class SAEConfig:
    """Shape and sparsity mechanism of a :class:`SparseAutoencoder`.

    Attributes:
        d_in: width of the site's activations (``d_model`` for the residual stream).
        d_sae: number of features (the dictionary size).
        activation: a registered architecture: ``relu``, ``topk``, ``batchtopk``, ``jumprelu``.
        k: active features per token for ``topk`` (exactly) and ``batchtopk`` (on average, in training).
        site: the canonical site the SAE reads (``blocks.1.hook_resid_post``).
        d_out: width of the reconstructed site for a transcoder (None: an SAE, ``d_out = d_in``).
        out_site: the site a transcoder reconstructs ("" for an SAE: it reconstructs `site`).
        skip: a skip-transcoder: add a learned linear map of the input to the reconstruction.
        apply_b_dec_to_input: subtract ``b_dec`` from the input before encoding (None: yes for an SAE,
            no for a transcoder, whose ``b_dec`` lives in another space).
    """

    d_in: int
    d_sae: int
    activation: str = "relu"
    k: int | None = None
    site: str = ""
    d_out: int | None = None
    out_site: str = ""
    skip: bool = False
    apply_b_dec_to_input: bool | None = None

    @property
    def transcoder(self) -> bool:
        """Whether this reconstructs another site than it reads."""
        return self.d_out is not None or bool(self.out_site)

    @property
    def width_out(self) -> int:
        """Width of the reconstruction."""
        return self.d_in if self.d_out is None else self.d_out

    @property
    def centre_input(self) -> bool:
        """Whether ``b_dec`` is subtracted from the input (see ``apply_b_dec_to_input``)."""
        return (not self.transcoder) if self.apply_b_dec_to_input is None else self.apply_b_dec_to_input

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise ConfigError(f"expected positive d_in and d_sae, got d_in={self.d_in}, d_sae={self.d_sae}")
        get_architecture(self.activation).validate(self)
        if self.transcoder and (self.d_out is None or self.d_out < 1):
            raise ConfigError(f"a transcoder (out_site={self.out_site!r}) needs a positive d_out, got {self.d_out}")
        if self.skip and not self.transcoder:
            raise ConfigError("skip=True makes a skip-transcoder; it needs out_site and d_out")
        if self.centre_input and self.transcoder and self.d_in != self.width_out:
            raise ConfigError(
                f"apply_b_dec_to_input needs d_in == d_out, got a transcoder {self.d_in} -> {self.width_out}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> SAEConfig:
        """A config from its saved dict, with unknown or missing fields named in the error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown SAE config fields {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ConfigError(f"{where}: malformed SAE config {data!r} ({exc})") from exc


class SparseAutoencoder(nn.Module):
    """Encoder, decoder and biases of one SAE (fp32 parameters; inputs are cast to them)."""

    def __init__(self, config: SAEConfig, *, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.architecture = get_architecture(config.activation)
        #: The model the SAE was trained on, when known (saved with it).
        self.model_info: ModelInfo | None = None
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
        if config.skip:
            self.W_skip = nn.Parameter(torch.zeros(config.d_in, config.width_out))
        for name, value in self.architecture.init_extra(config).items():
            if self.architecture.extra[name]:
                self.register_parameter(name, nn.Parameter(value))
            else:
                self.register_buffer(name, value)

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.config.d_in:
            raise ShapeError(
                f"expected activations with last dimension d_in={self.config.d_in}"
                + (f" (site {self.config.site})" if self.config.site else "")
                + f", got shape {tuple(x.shape)}"
            )

    def pre_activations(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """``W_enc^T (x - b_dec) + b_enc`` (without ``- b_dec`` for a transcoder). Under autograd on a
        ``[tokens, d_in]`` batch, through :class:`~mechscope.features.architectures.sparse_grad.Encode`,
        whose backward takes the sparse gradient of a top-k selection."""
        self._check(x)
        x = x.to(self.W_enc.dtype)
        if torch.is_grad_enabled() and x.ndim == 2 and self.W_enc.requires_grad:
            b_dec = self.b_dec if self.config.centre_input else None
            return Encode.apply(x, self.W_enc, self.b_enc, b_dec)  # type: ignore[no-any-return]
        return (x - self.b_dec if self.config.centre_input else x) @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations of `x` (non-negative)."""
        return self.architecture.encode(self, self.pre_activations(x))

    def decode(
        self, f: Float[Tensor, "... d_sae"], x: Float[Tensor, "... d_in"] | None = None
    ) -> Float[Tensor, "... d_out"]:
        """The reconstruction ``f @ W_dec + b_dec`` (plus ``x @ W_skip`` for a skip-transcoder, which
        needs the input `x`)."""
        if f.shape[-1] != self.config.d_sae:
            raise ShapeError(
                f"expected feature activations with last dimension {self.config.d_sae}, got {tuple(f.shape)}"
            )
        out = f @ self.W_dec + self.b_dec
        return out + self._skip(x)

    def decode_sparse(self, code: SparseCode, x: Tensor | None = None) -> Float[Tensor, "tokens d_out"]:
        """:meth:`decode` of a :class:`SparseCode` ``[tokens, k]``, reading only the active decoder rows."""
        out = nn.functional.embedding_bag(code.indices, self.W_dec, per_sample_weights=code.values, mode="sum")
        return out + self.b_dec + self._skip(x)

    def _skip(self, x: Tensor | None) -> Tensor | float:
        if not self.config.skip:
            return 0.0
        if x is None:
            raise ShapeError("a skip-transcoder's reconstruction needs its input x: decode(f, x)")
        return x.to(self.W_skip.dtype) @ self.W_skip

    def forward(self, x: Float[Tensor, "... d_in"]) -> tuple[Tensor, Tensor]:
        """``(reconstruction [..., d_out], feature activations)`` of `x`."""
        f = self.encode(x)
        return self.decode(f, x), f

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        """Rescale decoder rows to unit norm (and the encoder columns, biases and thresholds inversely:
        the same reconstruction)."""
        norms = self.W_dec.norm(dim=-1).clamp(min=1e-8)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        self.architecture.rescale(self, norms)

    def check_model(self, model: Any) -> None:
        """:class:`ModelMismatchError` when the SAE records another model than `model` (the error steering
        vectors give); an SAE that records no model is not checked."""
        info = self.model_info
        if info is not None and info.fingerprint != model.fingerprint():
            raise ModelMismatchError(
                f"this SAE was made on model {info.fingerprint} ({info.model_type}); the given model is "
                f"{model.fingerprint()} ({model.dims.model_type}). Train or load an SAE made on this model."
            )

    # Files ------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (weights, config, model info) in the shared envelope; returns it."""
        tensors = {k: v.detach() for k, v in self.state_dict().items()}
        envelope = Envelope("sae", {"config": asdict(self.config)}, tensors, self.model_info)
        return write_envelope(path, envelope, SAE_SCHEMA)

    @classmethod
    def load(cls, path: str | Path) -> SparseAutoencoder:
        """An SAE saved by :meth:`save` (or by older mechscope, with its sidecar ``.json``)."""
        path = Path(path)
        where = str(path)
        tensors, header = read_safetensors(path, SAE_SCHEMA.what)
        if not header.get("format", "").startswith("mechscope."):  # schema 1: the config lived beside the weights
            sidecar = path.with_suffix(".json")
            if not sidecar.is_file():
                raise ConfigError(f"{where}: not a mechscope SAE (no envelope header and no sidecar {sidecar})")
            data = read_json(sidecar, "SAE config")
            header = {"format": SAE_SCHEMA.format, "schema_version": "1", "sidecar": json.dumps(data)}
        header = check_header(header, SAE_SCHEMA, where)
        body = json.loads(header["body"])
        config = SAEConfig.from_dict(body.get("config", {}), where)
        sae = cls(config)
        model = json.loads(header.get("model", "null"))
        sae.model_info = None if model is None else ModelInfo.from_dict(model, where)
        sae.load_weights(tensors, where)
        return sae

    def load_weights(self, tensors: dict[str, Tensor], where: str) -> None:
        """Copy `tensors` into the parameters, naming missing, extra or mis-shaped ones in the error."""
        expected = self.state_dict()
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or extra:
            raise ConfigError(f"{where}: SAE weights missing {missing} and unexpected {extra}")
        for name, value in tensors.items():
            if tuple(value.shape) != tuple(expected[name].shape):
                raise ShapeError(
                    f"{where}: {name} has shape {tuple(value.shape)}, expected {tuple(expected[name].shape)}"
                )
        self.load_state_dict({k: v.float() for k, v in tensors.items()})


ACTIVATIONS = tuple(architectures())

__all__ = ["ACTIVATIONS", "SAE_SCHEMA", "SAEConfig", "SparseAutoencoder"]
