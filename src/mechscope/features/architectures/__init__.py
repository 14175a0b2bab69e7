"""The registry of SAE architectures: ``relu`` (L1), ``topk``, ``batchtopk``, ``jumprelu``.

Each lives in its own module and registers itself; :func:`get_architecture` looks one up by the name
``SAEConfig.activation`` gives. Transcoders and skip-transcoders are not architectures but shapes that
combine with any of them (``SAEConfig.out_site``, ``SAEConfig.skip``).
"""

from mechscope.features.architectures import batchtopk, jumprelu, relu, topk
from mechscope.features.architectures.base import (
    Architecture,
    SparseCode,
    architectures,
    get_architecture,
    register_architecture,
)

__all__ = [
    "Architecture",
    "SparseCode",
    "architectures",
    "batchtopk",
    "get_architecture",
    "jumprelu",
    "register_architecture",
    "relu",
    "topk",
]
