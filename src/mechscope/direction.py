"""The one currency between locating and steering: a :class:`Direction` in the residual stream.

A Direction holds an orthonormal basis ``B`` [k, d_model] (``k = 1``: a single unit direction ``r``;
``k > 1``: a subspace), the fingerprint of the model it was found on, and where it was found (site,
layer, position, the verb that found it). Probes, DAS, direct-logit-attribution directions and direction
selection all return one; every intervention that takes a direction (directional ablation,
orthogonalisation, steering) accepts one and checks it belongs to the model it is applied to.
It lives on the ground floor because verbs of several layers make and take it.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, ShapeError
from mechscope.results import Artifact


def orthonormal_basis(vectors: Any, d_model: int) -> Float[Tensor, "k d_model"]:
    """`vectors` ([d_model] or [k, d_model], or a :class:`Direction`) as an orthonormal float32 basis of
    their span, in their order (Gram-Schmidt by QR; signs follow the inputs). Validates width and rank."""
    if isinstance(vectors, Direction):
        return vectors.basis
    if not isinstance(vectors, Tensor):
        raise ConfigError(f"direction must be a tensor or a Direction; got {type(vectors).__name__}")
    if vectors.ndim == 1:
        return unit_direction(vectors, d_model).unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[1] != d_model or not 1 <= vectors.shape[0] <= d_model:
        raise ShapeError(
            f"directions must be [d_model]=({d_model},) or [k, d_model]=(k, {d_model}); got {tuple(vectors.shape)}"
        )
    rows = vectors.detach().float()
    if not bool(torch.isfinite(rows).all()):
        raise ConfigError("directions contain NaN or infinite values")
    q, r = torch.linalg.qr(rows.T)
    diag = r.diagonal()
    if bool((diag.abs() <= 1e-6 * rows.norm(dim=1).clamp(min=1e-30)).any()):
        raise ConfigError(f"the {rows.shape[0]} directions are linearly dependent (a zero or repeated direction)")
    return (q * diag.sign()).T.contiguous()


def unit_direction(direction: Any, d_model: int) -> Float[Tensor, " d_model"]:
    """`direction` (a tensor or :class:`Direction`) as a float32 unit vector; validates its width."""
    vec = direction.vector if isinstance(direction, Direction) else direction
    if not isinstance(vec, Tensor):
        raise ConfigError(f"direction must be a tensor or a Direction; got {type(direction).__name__}")
    if vec.ndim != 1 or vec.shape[0] != d_model:
        raise ShapeError(f"direction must be [d_model]=({d_model},); got {tuple(vec.shape)}")
    vec = vec.detach().float()
    if not bool(torch.isfinite(vec).all()):
        raise ConfigError("direction contains NaN or infinite values")
    norm = vec.norm()
    if float(norm) == 0.0:
        raise ConfigError("direction is the zero vector")
    return vec / norm


class Direction(Artifact):
    """A residual-stream direction (rank 1) or subspace (rank k), tied to the model it was found on.

    ``basis`` [k, d_model] is orthonormal; ``vector`` is the unit direction of a rank-1 Direction.
    """

    kind = "direction"

    def __init__(
        self,
        vectors: Float[Tensor, " d_model"] | Float[Tensor, "k d_model"],
        *,
        fingerprint: str,
        model_type: str,
        d_model: int,
        info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(fingerprint=fingerprint, model_type=model_type, d_model=d_model)
        self.basis = orthonormal_basis(vectors, d_model).cpu()
        self.info = dict(info or {})

    @property
    def rank(self) -> int:
        return int(self.basis.shape[0])

    @property
    def vector(self) -> Float[Tensor, " d_model"]:
        """The unit direction (rank 1 only: a subspace has no single vector)."""
        if self.rank != 1:
            raise ConfigError(f"this Direction spans {self.rank} dimensions and has no single vector; use .basis")
        return self.basis[0]

    @classmethod
    def from_tensor(cls, model: Any, vectors: Tensor, **info: Any) -> Direction:
        """A Direction for `model` (a HookedModel). `info` records where it was found: ``site`` (canonical
        name), ``layer``, ``position``, ``method`` (which verb made it) and anything else worth keeping."""
        if not callable(getattr(model, "fingerprint", None)) or getattr(model, "dims", None) is None:
            raise ConfigError(
                f"expected a mechscope HookedModel (mechscope.load_model(...)); got {type(model).__name__}"
            )
        return cls(vectors, info=info, **Artifact.model_info(model))

    @property
    def site(self) -> str | None:
        """The canonical site it was found at, when recorded."""
        site = self.info.get("site")
        layer = self.info.get("layer")
        if isinstance(site, str) and "." not in site:  # a site kind: a name only with its layer
            return f"blocks.{layer}.{site}" if isinstance(layer, int) else None
        return site if isinstance(site, str) else None

    @property
    def method(self) -> str | None:
        """The verb that found it (``"select_direction"``, ``"probe"``, ``"das"``, ``"dla"``...)."""
        method = self.info.get("method")
        return method if isinstance(method, str) else None

    def _parts(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return {"basis": self.basis}, {"info": self.info}

    @classmethod
    def _from_parts(cls, tensors: dict[str, Tensor], config: dict[str, Any], info: dict[str, Any]) -> Direction:
        vectors = tensors.get("basis", tensors.get("vector"))  # "vector": rank-1 files written before subspaces
        if vectors is None:
            raise ConfigError(f"expected a 'basis' (or 'vector') tensor in a direction file; got {sorted(tensors)}")
        return cls(
            vectors,
            info=config.get("info", {}),
            fingerprint=info["fingerprint"],
            model_type=info["model_type"],
            d_model=int(info["d_model"]),
        )

    def __repr__(self) -> str:
        return f"Direction(d_model={self.d_model}, rank={self.rank}, {self.info})"


__all__ = ["Direction", "orthonormal_basis", "unit_direction"]
