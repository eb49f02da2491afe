"""The decode step compiled ahead of time (torch.export + AOTInductor), loaded without the compiler.

`zili.engine.compiled_decode` compiles the decode step with torch.compile inside the serving
process: that imports torch._dynamo and torch._inductor (~140 MiB of the server's peak RSS) and,
even with Inductor's on-disk cache, re-traces the graphs on every start. Here the step is exported
once (`torch.export.export`) and compiled by AOTInductor into a package (a shared library plus its
metadata, `.pt2`), cached under $XDG_CACHE_HOME/zili/aot_decode; a server loads it with the C++
loader `torch._C._aoti.AOTIModelPackageLoader`, which imports nothing from the compiler.

The weights are not in the package. Every tensor the step reads from the model (parameters,
buffers, and the packed low-bit weights that zili.layers.quant keeps as plain attributes) is an
explicit input of the exported graph: `DecodeStep.forward` puts its weight arguments in place of
the model's tensors while it is traced. So the package holds code only (a few MiB), and the server
passes its own weight tensors to every call: no second copy, no name mapping of lifted constants
(export lifts plain tensor attributes under generated names that AOTInductor renames again). The
KV caches are inputs too, written in place by the graph (export's input mutations); the pool's block
count, the block-table width and the batch (inside each package's range) are dynamic dimensions.

zili's C++ kernels (paged decode attention, packed 4/8-bit matmuls) are custom operators, outside
AOTInductor's C shim: the generated code calls them through its proxy executor, which dispatches
by name to the operators the server has loaded (zili.kernels.cpu_isa) at run time.

Packages per batch range, as the torch.compile path has graphs: batch 1, then up to each quantized
layer's row limit, then past it (the packed/dense switch of zili.layers.quant is decided by row
count at trace time). The cache key covers what changes the graph (`package_key`); a package is
also checked against the server's own weight shapes and dtypes when loaded, and a package that
fails to load is deleted so that it is rebuilt.

A server without a cached package serves eagerly at once and builds the packages in a child
process at nice 19 (`python -m zili.engine.aot_decode_build`, one build per key at a time: a file lock),
then loads them between two steps. Any failure is logged; the caller then falls back to the
in-process torch.compile (zili.engine.compiled_decode).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zili import envs
from zili.engine.compiled_decode import COMPILE_THREAD_NAME
from zili.kernels.attention import AttentionMetadata
from zili.kernels.backends import AttentionBackend
from zili.models.base import CausalLM

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
MAX_BLOCKS = 1 << 24  # upper bounds of the dynamic dimensions (export needs finite ones to reason about)
MAX_TABLE_WIDTH = 1 << 16
_SRC_ROOT = Path(__file__).resolve().parent.parent  # src/zili


# ---------------------------------------------------------------------------- the model's tensors

@dataclass
class WeightSlot:
    """One tensor the decode step reads from the model, and every attribute path that holds it."""

    tensor: torch.Tensor
    paths: list[str]


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, nn.Module):
        yield from ((f".{k}", v) for k, v in obj._parameters.items())
        yield from ((f".{k}", v) for k, v in obj._buffers.items())
        yield from ((f".{k}", v) for k, v in obj._modules.items())
        yield from ((f".{k}", v) for k, v in vars(obj).items() if not k.startswith("_"))
    elif isinstance(obj, list):
        yield from ((f"[{i}]", v) for i, v in enumerate(obj))
    elif isinstance(obj, dict):
        yield from ((f"[{k!r}]", v) for k, v in obj.items() if isinstance(k, (str, int)))
    elif type(obj).__module__.startswith("zili.") and hasattr(obj, "__dict__"):
        # zili's weight holders (zili.layers.quant, zili.kernels.cpu_quant) are plain objects.
        yield from ((f".{k}", v) for k, v in vars(obj).items())


def weight_slots(model: nn.Module) -> list[WeightSlot]:
    """Every tensor reachable from `model` through modules, zili's plain objects, lists and dicts, in
    a deterministic order (the same model built twice gives the same list). A tensor held at several
    paths (tied embeddings) is one slot. Tuples are not walked: they cannot be reassigned."""
    slots: dict[int, WeightSlot] = {}
    seen: set[int] = set()

    def walk(obj: Any, path: str, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            slot = slots.get(id(obj))
            if slot is None:
                slots[id(obj)] = WeightSlot(obj, [path])
            else:
                slot.paths.append(path)
            return
        if id(obj) in seen or depth > 16:
            return
        seen.add(id(obj))
        for key, child in _children(obj):
            if child is not None and not isinstance(child, (int, float, str, bool, torch.dtype, torch.device)):
                walk(child, path + key, depth + 1)

    walk(model, "", 0)
    return list(slots.values())


_PART = re.compile(r"\.([^.\[]+)|\[(\d+|'[^']*')\]")


def _parse(path: str) -> list[str | int]:
    parts: list[str | int] = []
    for attr, index in _PART.findall(path):
        parts.append(attr if attr else (int(index) if index.isdigit() else index[1:-1]))
    return parts


def _get(obj: Any, part: str | int) -> Any:
    return obj[part] if isinstance(part, int) or isinstance(obj, dict) else getattr(obj, part)


def resolve(model: nn.Module, path: str) -> Any:
    """The object at `path` (as `weight_slots` writes them) under `model`; AttributeError, KeyError or
    IndexError when the model has no such attribute."""
    obj: Any = model
    for part in _parse(path):
        obj = _get(obj, part)
    return obj


def _assign(model: nn.Module, path: str, value: torch.Tensor) -> None:
    parts = _parse(path)
    owner: Any = model
    for part in parts[:-1]:
        owner = _get(owner, part)
    last = parts[-1]
    if isinstance(owner, nn.Module) and isinstance(last, str) and last in owner._parameters:
        owner._parameters[last] = value  # type: ignore[assignment]  # a plain tensor in a Parameter's place
    elif isinstance(owner, nn.Module) and isinstance(last, str) and last in owner._buffers:
        owner._buffers[last] = value
    elif isinstance(last, int) or isinstance(owner, dict):
        owner[last] = value
    else:
        object.__setattr__(owner, last, value)


@contextlib.contextmanager
def _tensors_in_place(model: nn.Module, slots: list[WeightSlot], tensors: tuple[torch.Tensor, ...]) -> Iterator[None]:
    for slot, t in zip(slots, tensors):
        for path in slot.paths:
            _assign(model, path, t)
    try:
        yield
    finally:
        for slot in slots:
            for path in slot.paths:
                _assign(model, path, slot.tensor)


def onednn_handles(model: nn.Module) -> list[list[Any]]:
    """[module name, handle, out_features] of every oneDNN-packed weight (zili.layers.onednn). Its
    operator takes an integer handle into a per-process registry, which the exported graph holds as a
    constant: a package built by another process is only right where the same layers got the same
    handles (the same model built the same way in a fresh process), so the handles are part of the key."""
    return [[name, int(m.packed.handle), int(m.packed.out_features)] for name, m in model.named_modules()
            if hasattr(getattr(m, "packed", None), "handle")]


def signature(slots: list[WeightSlot]) -> list[list[Any]]:
    """What a package expects of each weight input: its paths, shape and dtype."""
    return [[s.paths, list(s.tensor.shape), str(s.tensor.dtype)] for s in slots]


class DecodeStep(nn.Module):
    """The decode step as a function of tensors only: `forward(input_ids [B], positions [B],
    slot_mapping [B], block_tables [B, W], seq_lens [B], kv_caches, weights)` -> float32 logits
    [B, vocab], writing each new token's K/V into `kv_caches` in place. `weights` stand in for the
    model's own tensors (`weight_slots` order) while the step runs."""

    def __init__(self, model: CausalLM, slots: list[WeightSlot], block_size: int,
                 attention: AttentionBackend | None) -> None:
        super().__init__()
        # Not registered as a submodule: export would otherwise lift its parameters as constants.
        object.__setattr__(self, "inner", model)
        self.slots = slots
        self.block_size = block_size
        self.attention = attention

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                block_tables: torch.Tensor, seq_lens: torch.Tensor, kv_caches: tuple[torch.Tensor, ...],
                weights: tuple[torch.Tensor, ...]) -> torch.Tensor:
        model: CausalLM = self.inner  # type: ignore[assignment]
        with _tensors_in_place(model, self.slots, weights):
            meta = AttentionMetadata.decode(slot_mapping, block_tables, seq_lens, self.block_size, self.attention)
            hidden = model(input_ids, positions, list(kv_caches), meta)
            return model.compute_logits(hidden).float()


# ---------------------------------------------------------------------------- the cache key

# What the traced graph is made of: the model families, layers, kernels (and their C++ sources),
# the attention metadata and this module. Edits elsewhere (the server, the scheduler) keep packages valid.
GRAPH_SOURCES = ("models", "layers", "kernels", "platforms", "config.py", "engine/aot_decode.py")


def _source_digest() -> str:
    h = hashlib.sha256()
    for part in GRAPH_SOURCES:
        base = _SRC_ROOT / part
        for path in sorted(base.rglob("*")) if base.is_dir() else [base]:
            if path.suffix in (".py", ".cpp", ".h") and path.is_file():
                h.update(str(path.relative_to(_SRC_ROOT)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _model_identity(model_ref: str) -> list[Any]:
    """The model argument with its files' sizes and modification times (a replaced file is another model)."""
    path = Path(model_ref)
    if not path.exists():
        return [model_ref]
    files = sorted(p for p in (path.rglob("*") if path.is_dir() else [path]) if p.is_file())
    return [str(path.resolve())] + [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files
                                    if p.suffix in (".gguf", ".safetensors", ".json", ".bin")]


def package_key(model_ref: str, model: nn.Module, slots: list[WeightSlot], kv_caches: list[torch.Tensor],
                block_size: int, attention_name: str, batch_ranges: list[tuple[int, int]]) -> str:
    """A digest of everything that changes the compiled graph: the model's files, its dtype and
    weight layout (every weight input's shape and dtype, which covers the packing chosen), the KV
    cache's dtype and per-block shape, block size, attention backend, the batch ranges (from the
    quantized layers' row limits), the CPU kernel level and flags, torch's version and zili's sources."""
    from zili.kernels import cpu_isa
    from zili.platforms.cpu import native_cpu_isa

    parts = {
        "format": FORMAT_VERSION,
        "model": _model_identity(model_ref),
        "type": type(model).__qualname__,
        "weights": [[list(s.tensor.shape), str(s.tensor.dtype)] for s in slots],
        "onednn_handles": onednn_handles(model),
        "kv": [[list(c.shape[:1]) + list(c.shape[2:]), str(c.dtype)] for c in kv_caches],
        "block_size": block_size,
        "attention": attention_name,
        "batch_ranges": batch_ranges,
        "cpu_isa": [cpu_isa.selected() if cpu_isa.enabled() else "off", native_cpu_isa()],
        "torch": torch.__version__,
        "zili": _source_digest(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_root() -> Path:
    """Where packages are cached: ZILI_AOT_DECODE_DIR, default $XDG_CACHE_HOME/zili/aot_decode."""
    return envs.aot_decode_dir()


# ---------------------------------------------------------------------------- build (compiler side)

def batch_ranges(sizes: list[int], max_rows: int) -> list[tuple[int, int]]:
    """Batch ranges [lo, hi] for one package each: the torch.compile path's graph boundaries
    (`sizes`: 1, 2 and one past each quantized row limit) up to `max_rows`."""
    starts = sorted({s for s in sizes if 1 <= s <= max_rows})
    return [(lo, (starts[i + 1] - 1) if i + 1 < len(starts) else max_rows) for i, lo in enumerate(starts)]


def _example(batch: int, block_size: int, attention: AttentionBackend | None) -> tuple[torch.Tensor, ...]:
    meta = AttentionMetadata.build([1] * batch, [1] * batch, [[0, 0]] * batch, block_size, backend=attention)
    zeros = torch.zeros(batch, dtype=torch.long)
    return zeros, zeros.clone(), meta.slot_mapping, meta.block_tables, meta.seq_lens


def build_packages(model: CausalLM, kv_caches: list[torch.Tensor], block_size: int,
                   attention: AttentionBackend | None, ranges: list[tuple[int, int]], out_dir: Path) -> list[Path]:
    """Export the decode step for each batch range and compile it with AOTInductor into `out_dir`
    (weights not packaged). Imports the compiler: run it in a child process or a test, not in a
    server. The KV caches are only read for their shapes (the example step writes into block 0)."""
    from torch._inductor import aoti_compile_and_package
    from torch.export import Dim

    slots = weight_slots(model)
    keep = {id(c) for c in kv_caches}
    slots = [s for s in slots if id(s.tensor) not in keep]
    step = DecodeStep(model, slots, block_size, attention)
    scratch = tuple(torch.zeros((c.shape[0], 2, *c.shape[2:]), dtype=c.dtype) for c in kv_caches)
    weights = tuple(s.tensor for s in slots)
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = Dim("num_blocks", min=2, max=MAX_BLOCKS)
    width = Dim("table_width", min=2, max=MAX_TABLE_WIDTH)
    made = []
    for lo, hi in ranges:
        args = _example(lo, block_size, attention)
        if lo == hi:
            rows: dict[int, Any] = {}
        else:
            rows = {0: Dim(f"batch_{lo}_{hi}", min=lo, max=hi)}
        dynamic = [rows or None, rows or None, rows or None, {**rows, 1: width}, rows or None,
                   tuple({1: blocks} for _ in scratch), tuple(None for _ in weights)]
        start = time.perf_counter()
        with torch.no_grad():
            program = torch.export.export(step, (*args, scratch, weights), dynamic_shapes=dynamic, strict=False)
        exported = time.perf_counter() - start
        lifted = sorted(program.constants) + sorted(program.state_dict)
        if lifted:  # a tensor reached by a path weight_slots does not walk, or made inside the forward
            raise RuntimeError(f"the exported decode step holds tensors that are not inputs: {lifted[:5]}")
        path = out_dir / f"decode-b{lo}-{hi}.pt2"
        aoti_compile_and_package(program, package_path=str(path),
                                 inductor_configs={"aot_inductor.package_constants_in_so": False})
        logger.info("AOT decode: batch %d-%d exported in %.1f s, compiled in %.1f s", lo, hi, exported,
                    time.perf_counter() - start - exported)
        made.append(path)
    (out_dir / MANIFEST).write_text(json.dumps({"format": FORMAT_VERSION, "ranges": ranges, "weights": signature(slots),
                                                "onednn_handles": onednn_handles(model), "torch": torch.__version__}))
    return made


@contextlib.contextmanager
def _key_lock(root: Path, key: str) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{key}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # another process building the same key: wait for it
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_into_cache(model: CausalLM, kv_caches: list[torch.Tensor], block_size: int,
                     attention: AttentionBackend | None, ranges: list[tuple[int, int]], key: str,
                     root: Path | None = None) -> Path:
    """`build_packages` into `root/key` (default: `cache_root()`), atomically: built in a temporary
    folder, renamed into place; a build of the same key by another process is waited for, not redone."""
    root = root or cache_root()
    final = root / key
    with _key_lock(root, key):
        if (final / MANIFEST).exists():
            return final
        for stale in root.glob(f"{key}.tmp-*"):  # left by a build that was killed (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        try:
            build_packages(model, kv_caches, block_size, attention, ranges, tmp)
            shutil.rmtree(final, ignore_errors=True)  # a rejected (corrupt) one
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------- serve (no compiler)

class AOTDecode:
    """Decode-only steps through AOTInductor packages; `__call__(input_ids, positions, meta)` returns
    float32 logits [B, vocab] like `CompiledDecode`. Raises ValueError for a batch no package covers."""

    def __init__(self, packages: list[tuple[int, int, Any]], kv_caches: list[torch.Tensor],
                 weights: list[torch.Tensor]) -> None:
        self.packages = packages  # (lo, hi, loader)
        self.kv_caches = kv_caches
        self.weights = weights
        self.compile_seconds = 0.0

    @classmethod
    def load(cls, folder: Path, model: nn.Module, kv_caches: list[torch.Tensor]) -> AOTDecode:
        """Load the packages in `folder` with the C++ loader and bind them to `model`'s own tensors.
        ValueError when the folder does not fit this model (a stale or corrupt package)."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"no readable {MANIFEST} in {folder}: {exc}") from exc
        if manifest.get("format") != FORMAT_VERSION or manifest.get("torch") != torch.__version__:
            raise ValueError(f"{folder} was built by another zili/torch version")
        if manifest.get("onednn_handles", []) != onednn_handles(model):
            raise ValueError("this model's oneDNN-packed weights have other handles than the package's")
        weights = []
        for paths, shape, dtype in manifest["weights"]:
            try:
                t = resolve(model, paths[0])
            except (AttributeError, KeyError, IndexError, TypeError) as exc:
                raise ValueError(f"the package reads {paths[0]}, which this model lacks") from exc
            if not isinstance(t, torch.Tensor) or list(t.shape) != shape or str(t.dtype) != dtype:
                raise ValueError(f"the package expects {paths[0]} as {dtype}{shape}")
            weights.append(t)
        packages = []
        for lo, hi in manifest["ranges"]:
            path = folder / f"decode-b{lo}-{hi}.pt2"
            try:
                loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
            except Exception as exc:  # a truncated or foreign file: the C++ loader's own error
                raise ValueError(f"{path.name} does not load: {exc}") from exc
            constants = loader.get_constant_fqns()
            if constants:  # tensors the graph made at trace time: not packaged, and not ours to supply
                raise ValueError(f"{path.name} expects constants {constants[:3]} that are not in the package")
            packages.append((lo, hi, loader))
        return cls(packages, kv_caches, weights)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        b = input_ids.shape[0]
        loader = next((run for lo, hi, run in self.packages if lo <= b <= hi), None)
        if loader is None:
            raise ValueError(f"no AOT decode package covers a batch of {b}")
        tables = meta.block_tables
        if tables.shape[1] < 2:
            tables = torch.nn.functional.pad(tables, (0, 2 - tables.shape[1]))
        return loader.run([input_ids, positions, meta.slot_mapping, tables, meta.seq_lens,
                           *self.kv_caches, *self.weights])[0]


def try_load_cached(key: str, model: nn.Module, kv_caches: list[torch.Tensor],
                    root: Path | None = None) -> AOTDecode | None:
    """The cached packages for `key`, loaded; None when there are none. A folder that does not load
    is logged and deleted (so that the next build replaces it)."""
    folder = (root or cache_root()) / key
    if not (folder / MANIFEST).exists():
        return None
    try:
        return AOTDecode.load(folder, model, kv_caches)
    except ValueError as exc:
        logger.warning("AOT decode: rejecting the cached package %s (%s); it will be rebuilt", folder.name, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None


BUILD_NICE = 19
PR_SET_PDEATHSIG = 1


def _in_child() -> None:
    """The build process runs at nice 19 (it must not slow the requests served meanwhile), leads a process
    group of its own (the C++ compilers it starts join it) and gets SIGTERM when the server exits (Linux);
    `stop_group_on_sigterm` then stops the whole group, so that a stopped server leaves no compiler running."""
    os.nice(BUILD_NICE)
    os.setpgrp()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def stop_group_on_sigterm() -> None:
    """In the build process: on SIGTERM, kill its process group (itself and the g++ / cc1plus that
    Inductor started, which the parent's death signal alone leaves running, reparented to init)."""
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))


def failed_marker(key: str, root: Path | None = None) -> Path:
    """The file a build that failed on its own leaves for `key` (its exit code and log): later servers then
    compile in-process instead of retrying a build that cannot succeed (a model export refuses, a missing
    C++ compiler) on every start. Delete it to try again; a new zili or torch version changes the key."""
    return (root or cache_root()) / f"{key}.failed"


def start_child_build(config_blob: bytes, key: str, ranges: list[tuple[int, int]],
                      on_done: Callable[[int], None], root: Path | None = None) -> threading.Thread:
    """Build the packages for `key` in a child process (`python -m zili.engine.aot_decode_build`, nice 19)
    that loads the same model from the pickled EngineConfig `config_blob`; `on_done(returncode)` runs
    on a watcher thread when it exits."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.job-*"):  # left by a server that exited while its build ran
        with contextlib.suppress(ValueError, OSError):
            pid = int(stale.name.rsplit("-", 1)[1])
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                stale.unlink()
    job = root / f"{key}.job-{os.getpid()}"
    job.write_bytes(pickle.dumps({"config": config_blob, "key": key, "ranges": ranges, "root": str(root)}))

    def watch() -> None:
        log = root / f"{key}.log"
        try:
            with open(log, "wb") as out:
                proc = subprocess.Popen([sys.executable, "-m", "zili.engine.aot_decode_build", str(job)],
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        preexec_fn=_in_child)
                code = proc.wait()
        except OSError as exc:
            logger.warning("AOT decode: could not start the build process (%s)", exc)
            code = -1
        finally:
            job.unlink(missing_ok=True)
        if code != 0:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            logger.warning("AOT decode: the build process exited with %d; last output:\n%s", code, tail)
        if code > 0:  # failed by itself (a signal, as when the server stops, gives a negative code)
            with contextlib.suppress(OSError):
                failed_marker(key, root).write_text(f"exit code {code}; see {log}\n")
        on_done(code)

    # The background compile's thread name: a server stopped meanwhile exits at once (zili.server.launcher),
    # and the child, on its parent's death signal, with it.
    thread = threading.Thread(target=watch, name=COMPILE_THREAD_NAME, daemon=True)
    thread.start()
    return thread
