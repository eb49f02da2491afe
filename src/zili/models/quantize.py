"""Attach quantized weights to a loaded model's projections (`--quantization`).

Modes:
  auto  GGUF checkpoints keep their own quantization: Q4_0/Q4_1/Q4_K projections become int4
        with their codes unchanged, Q8_0/Q5_K/Q6_K become int8; float checkpoints stay dense.
  int4  every projection int4 (GGUF 4-bit blocks exactly, anything else quantized per group of 32).
  int8  every projection int8 per output row.
  none  dense only (the previous path, kept for debugging and for the tuner).
The LM head is never made int4: requantizing it to 4 bits costs too much accuracy (top-1
agreement fell to 84% on SmolLM2); it gets int8 whenever the others are quantized.

`quantize_and_calibrate` is the one path from a loaded model to its serving weights, used by the
single-process engine's builder and by every tensor-parallel shard (zili.distributed.weights):
choose each layer shape's packed kernel and row limit (tune cache, else measured now:
zili.layers.quant_calibration), quantize with those, release the dense weights that zili's kernels
make unnecessary (ZILI_DENSE_WEIGHTS=dequant: past a layer's row limit its codes are dequantized into
scratch memory), then pre-pack the dense rest for oneDNN.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from zili import envs
from zili.choices import QUANTIZATION_MODES
from zili.kernels import cpu_isa
from zili.kernels.cpu_quant import huge_page_weights
from zili.layers import onednn, quant_calibration
from zili.layers.embedding import VocabEmbedding
from zili.layers.linear import Linear, dense_weight_keeper, release_dense_weights
from zili.layers.quant import (
    DEFAULT_MAX_ROWS,
    INT4_GGUF_TYPES,
    GroupQuant,
    Int4Weight,
    Int8Weight,
    concat_group_quants,
    float_group_quant,
    gguf_group_quant,
)
from zili.layers.quant_calibration import (
    BUSY_LOAD_PER_CPU,
    DEFAULT_BUDGET_S,
    TORCH,
    UNBOUNDED_ROWS,
    Calibration,
    KernelChoice,
    busy_choice,
    calibrate_kernels,
    candidates,
    default_choice,
    load_per_cpu,
    parallel_min_bytes,
    row_invariant_choice,
    shape_key,
    usable,
)
from zili.platforms import current_platform
from zili.weights.gguf import GGUFCheckpoint, RawTensor
from zili.weights.safetensors import HFCheckpoint

LM_HEAD = "lm_head"
# Bytes of packed weights placed between two trims of the heap while quantizing (see quantize_model).
HEAP_TRIM_EVERY_BYTES = 8 << 20


@runtime_checkable
class RawCheckpoint(Protocol):
    """A checkpoint whose stored quantized blocks can be packed as they are: a `GGUFCheckpoint`, or one
    tensor-parallel rank's view of it (`zili.models.sharding.ShardedRawCheckpoint`)."""

    def raw_tensor(self, name: str) -> RawTensor:
        """The stored blocks of HF-named tensor `name`; KeyError where there are none to take."""
        ...

logger = logging.getLogger(__name__)


@dataclass
class QuantizeReport:
    """What `quantize_and_calibrate` did: layers per form ("int4", "int8", "dense"), dense
    projections pre-packed for oneDNN, the packed kernel and row limit per layer shape
    (`kernels`, shape_key -> KernelChoice) with where each came from (`how`: shape_key ->
    "tune cache", "measured" or "default"), and the choices measured now on a host that was not
    overloaded (`measured`: worth caching).
    `max_rows` is set when one tuned limit was applied to every layer (zili tune's quant_max_rows)."""

    counts: dict[str, int]
    packed_dense: int = 0
    max_rows: int | None = None
    kernels: dict[str, KernelChoice] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)
    measured: dict[str, KernelChoice] = field(default_factory=dict)
    calibration: Calibration | None = None
    tied_table_released: bool = False  # serve_tied_embedding_from_head dropped the dense table
    dequantized_dense: int = 0  # layers whose dense weight was released (release_dense_weights)
    # zili kernel level -> the work below which its calls run on one thread (set_kernel_parallelism)
    parallel_min_bytes: dict[str, int] = field(default_factory=dict)


def quantize_and_calibrate(model: nn.Module, mode: str, dtype: torch.dtype, matmul_backend: str,
                           open_checkpoint: Callable[[], Any] | None = None,
                           max_rows: int | None = None, tuned_kernels: dict[str, KernelChoice] | None = None,
                           calibrate: bool | None = None, budget_s: float | None = DEFAULT_BUDGET_S,
                           trust_busy: bool = False, row_invariant: bool = False) -> QuantizeReport:
    """Turn a loaded model's projections into their serving form, in place.

    `mode`: a QUANTIZATION_MODES entry; `matmul_backend`: the platform's (`Platform.matmul_backend()`;
    only "cpu-packed" has int4/int8 kernels, elsewhere the weights stay dense); `open_checkpoint`:
    opens the raw (GGUF) checkpoint whose 4-bit blocks are kept as they are, None for float
    checkpoints (a tensor-parallel rank passes its sharded view); `max_rows`: one tuned row limit
    for every layer (overrides the per-shape ones); `tuned_kernels`: shape_key -> KernelChoice from
    the tune cache; shapes it lacks are measured (`calibrate_kernels`, within `budget_s` seconds)
    unless `calibrate` is False (None: ZILI_CALIBRATE; they get `default_choice()`) or the host is
    overloaded (unless `trust_busy`: `zili tune`, which records the load; they get `busy_choice()`).
    `row_invariant` (batch-invariant mode): every shape gets `row_invariant_choice()`, nothing is
    measured. ValueError for an unknown mode."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
    if matmul_backend != "cpu-packed":
        if mode != "none":
            logger.info("weights: dense (no packed int4/int8 matmul on this device)")
        _load_deferred(model, open_checkpoint)
        return QuantizeReport({})
    checkpoint = open_checkpoint() if mode != "none" and open_checkpoint is not None else None
    plan = plan_quantization(model, mode, checkpoint)
    report = QuantizeReport({})
    if row_invariant:
        for key in _plan_shapes(model, plan, dtype):
            report.kernels[key], report.how[key] = row_invariant_choice(), "batch-invariant mode"
    else:
        _choose_kernels(model, plan, dtype, tuned_kernels or {}, envs.calibrate() if calibrate is None else calibrate,
                        budget_s, trust_busy, report)
    report.counts = dict(quantize_model(model, mode, checkpoint, kernels=report.kernels, dtype=dtype, plan=plan))
    if max_rows is not None and report.counts.keys() - {"dense"}:
        set_quant_max_rows(model, max_rows)
        report.max_rows = max_rows
    # Before packing for oneDNN: a table held once as int8 gets no bf16 packed copy either.
    report.tied_table_released = serve_tied_embedding_from_head(model)
    if report.tied_table_released:
        logger.info("weights: the tied embedding / LM head table is held once, as the checkpoint's Q8_0 codes (the "
                    "head's int8 kernel serves every batch size; lookups and its top-k refinement read its rows)")
    # Layers on zili's kernels serve batches past their row limit from their codes (dequantized into
    # scratch memory): their dense weights go before oneDNN would pack a copy of them.
    if envs.dense_weights() == "dequant":
        report.dequantized_dense = release_dense_weights(model)
        if report.dequantized_dense:
            logger.info("weights: %d quantized projections hold no dense copy (past their row limit they dequantize "
                        "into a scratch buffer for the dense matmul; ZILI_DENSE_WEIGHTS=copy keeps copies)",
                        report.dequantized_dense)
    # A projection the loader deferred but that keeps its dense weight after all (its kernel cannot
    # dequantize, ZILI_DENSE_WEIGHTS=copy) reads it now, before oneDNN packs it.
    _load_deferred(model, open_checkpoint, checkpoint)
    # Dense weights pre-packed for oneDNN after quantizing (which reads them).
    if onednn.available(dtype):
        report.packed_dense = onednn.pack_dense_weights(model)
        logger.info("weights: %d dense projections pre-packed for oneDNN (bf16)", report.packed_dense)
    if report.counts.keys() - {"dense"}:
        report.parallel_min_bytes = set_kernel_parallelism(
            report, load_per_cpu() > BUSY_LOAD_PER_CPU and not quant_calibration.raised_priority())
        logger.info("weights: %s", ", ".join(f"{n} {form}" for form, n in report.counts.items()))
        for key, choice in report.kernels.items():
            rows = f"up to {max_rows} rows (tuned for the whole model), dense above" if max_rows is not None else \
                "at every row count" if choice.max_rows >= UNBOUNDED_ROWS else \
                f"up to {choice.max_rows} rows, dense above"
            logger.info("packed matmul %s: %s kernel %s (%s)", key,
                        "zili's " + choice.kernel if choice.kernel != TORCH else "torch's", rows, report.how[key])
    return report


def set_kernel_parallelism(report: QuantizeReport, busy: bool) -> dict[str, int]:
    """Set, on every zili kernel level the model runs (its packed layers' and the attention kernel's,
    `cpu_isa.selected()`), the work below which a call stays on one thread (`parallel_min_bytes`:
    ZILI_PARALLEL_MIN_BYTES, else by whether the host is `busy`). Returns level -> bytes set."""
    if not cpu_isa.enabled():
        return {}
    levels = {c.kernel for c in report.kernels.values() if c.kernel != TORCH} | {cpu_isa.selected()}
    nbytes = parallel_min_bytes(busy)
    done = {level: nbytes for level in sorted(levels) if cpu_isa.load(level)}
    for level in done:
        cpu_isa.set_parallel_min_bytes(nbytes, level)
    if nbytes:
        logger.info("zili's CPU kernels: calls under %d KiB of work run on one thread (%s)", nbytes >> 10,
                    "ZILI_PARALLEL_MIN_BYTES" if envs.parallel_min_bytes() is not None else "busy host")
    return done


def deferrable_projections(model: nn.Module, mode: str,
                           checkpoint: GGUFCheckpoint | HFCheckpoint | None) -> dict[str, list[str]]:
    """Module name -> checkpoint tensor names, for the projections whose dense weight need not be loaded
    before `quantize_and_calibrate`: those it will pack from the GGUF checkpoint's own codes (int4 from
    Q4_0/Q4_1/Q4_K, int8 from Q8_0) and whose dense copy `release_dense_weights` will then drop
    (ZILI_DENSE_WEIGHTS=dequant; not the model's `dense_weight_readers`, not a weight shared with another
    module). Loading them dense first (bf16, or fp32 on AVX2) was the peak of the whole build: SmolLM2's
    projections are ~200 MiB in bf16 against 92 MiB packed (benchmarks/notes/memory.md). Empty for
    float checkpoints, mode "none" and ZILI_DENSE_WEIGHTS=copy. Assumes the cpu-packed matmul backend."""
    if mode == "none" or envs.dense_weights() != "dequant" or not isinstance(checkpoint, GGUFCheckpoint):
        return {}
    keeps = dense_weight_keeper(model)
    raw_types = _raw_type_reader(checkpoint)
    modules = dict(model.named_modules())
    deferred: dict[str, list[str]] = {}
    for name, form in plan_quantization(model, mode, checkpoint).items():
        module = modules[name]
        if type(module) is not Linear or (keeps(name, module) and not _tied_head(model, name, module)):
            continue
        shards = _shard_names(model, name, module)
        types = [raw_types(s) for s in shards]
        from_codes = (form == "int4" and all(t in INT4_GGUF_TYPES for t in types)) or \
            (form == "int8" and _q8_0_raws(checkpoint, shards) is not None)
        if from_codes:
            deferred[name] = shards
    return deferred


def _tied_head(model: nn.Module, name: str, module: Linear) -> bool:
    """Whether `module` is an LM head whose only other holder is the tied token embedding. Deferred
    when its table is Q8_0 (`deferrable_projections`): the head is packed from the codes and
    `serve_tied_embedding_from_head` serves the lookups and the head's top-k refinement (its dense
    reader) from them, so the dense table (SmolLM2's 49,152 x 576: 113 MiB in fp32) is never built;
    where the head then cannot be served exactly (torch's int8 kernel), `_load_deferred` reads it."""
    if name != LM_HEAD or not getattr(model.config, "tie_word_embeddings", False):
        return False
    holders = [m for m in model.modules() if getattr(m, "weight", None) is module.weight]
    return len(holders) == 2 and any(isinstance(m, VocabEmbedding) for m in holders)


def _q8_0_raws(checkpoint: RawCheckpoint | HFCheckpoint | None, shards: list[str]) -> list[RawTensor] | None:
    """The shards' raw GGUF tensors if every one is a 2-D Q8_0 tensor (the form `_q8_0_blocks` takes),
    else None (always for a float checkpoint); their codes are not read."""
    if not isinstance(checkpoint, RawCheckpoint):
        return None
    raws = []
    for hf in shards:
        try:
            raw = checkpoint.raw_tensor(hf)
        except KeyError:
            return None
        if raw.qtype != QT.Q8_0 or len(raw.shape) != 2:
            return None
        raws.append(raw)
    return raws


def _load_deferred(model: nn.Module, open_checkpoint: Callable[[], Any] | None,
                   checkpoint: GGUFCheckpoint | None = None) -> int:
    """Read the dense weight of every projection still `weight_deferred` (see `deferrable_projections`)
    from `checkpoint` (else the one `open_checkpoint` opens: the GGUF file the loader deferred them
    from, `deferrable_projections` deferring nothing else), as the loader would have. Returns how many."""
    pending = [(n, m) for n, m in _linears(model) if m.weight_deferred]
    if not pending:
        return 0
    if checkpoint is None:
        if open_checkpoint is None:
            raise ValueError("the loader deferred dense weights but no checkpoint was given to read them from")
        checkpoint = open_checkpoint()
    for name, module in pending:
        dtype = module.weight.dtype
        module.weight.data = torch.empty(module.out_features, module.in_features, dtype=dtype, device=module.weight.device)
        for shard, hf in enumerate(_shard_names(model, name, module)):
            module.load("weight", checkpoint.tensor(hf, dtype), shard)
        module.weight_deferred = False
    return len(pending)


def _choose_kernels(model: nn.Module, plan: dict[str, str], dtype: torch.dtype, tuned: dict[str, KernelChoice],
                    calibrate: bool, budget_s: float | None, trust_busy: bool, report: QuantizeReport) -> None:
    """Fill report.kernels / how / measured for every quantized shape in `plan`. On an overloaded host
    (more runnable threads than CPUs) every call waits for time slices, so the timings rank nothing:
    the start-up calibration is skipped or its result dropped for the defaults (`trust_busy`: keep it)."""
    shapes = _plan_shapes(model, plan, dtype)
    allowed = candidates()
    for key in shapes:
        choice = tuned.get(key)
        if choice is not None and choice.kernel in allowed and usable(choice.kernel):
            report.kernels[key], report.how[key] = choice, "tune cache"
    missing = {k: v for k, v in shapes.items() if k not in report.kernels}
    fallback, why = default_choice(), "default"  # uncalibrated, or cut by the budget
    busy_now = load_per_cpu() > BUSY_LOAD_PER_CPU and not trust_busy
    if missing and calibrate and busy_now:
        logger.warning("packed matmuls: not calibrated, the host is busy (load average %.1f per CPU: timings would be "
                       "other processes' time slices): this CPU level's kernel up to %d rows for %d shape(s); the next "
                       "start measures again", load_per_cpu(), busy_choice().max_rows, len(missing))
        fallback, why = busy_choice(), "busy host"
    elif missing and calibrate:
        cal = calibrate_kernels(missing, dtype, allowed, budget_s,
                                per_sequence=_per_sequence_shapes(model, plan, dtype))
        report.calibration = cal
        logger.info("calibrated the packed matmuls for %d layer shape(s) in %.2f s (budget %s s; candidates %s)%s",
                    len(cal.choices), cal.seconds, budget_s, ", ".join(allowed),
                    f"; past the budget, defaults for {', '.join(cal.cut)}" if cal.cut else "")
        if cal.busy and not trust_busy:
            logger.warning("the host got busy while calibrating (load average %.1f per CPU): the measured choices are "
                           "dropped (this CPU level's kernel up to %d rows instead) and not cached; the next start "
                           "measures again", cal.load_per_cpu, busy_choice().max_rows)
            fallback, why = busy_choice(), "busy host"
        else:
            report.measured = dict(cal.choices)
            report.kernels.update(cal.choices)
            report.how.update(dict.fromkeys(cal.choices, "measured"))
    elif missing:
        logger.info("packed matmuls: not calibrated (ZILI_CALIBRATE=0 or --no-calibrate): defaults for %d shape(s)",
                    len(missing))
    for key in shapes:
        if key not in report.kernels:
            report.kernels[key], report.how[key] = fallback, why


def _per_sequence_shapes(model: nn.Module, plan: dict[str, str], dtype: torch.dtype) -> set[str]:
    """The shape keys only an LM head has: it multiplies one row per sequence of a step (the last
    position of each prompt, each decode token), never a prefill chunk's rows, so its calibration
    stops at decode row counts."""
    heads = {name: form for name, form in plan.items() if name.rsplit(".", 1)[-1] == "lm_head"}
    rest = {name: form for name, form in plan.items() if name not in heads}
    return set(_plan_shapes(model, heads, dtype)) - set(_plan_shapes(model, rest, dtype))


def _plan_shapes(model: nn.Module, plan: dict[str, str], dtype: torch.dtype) -> dict[str, tuple[str, int, int, int]]:
    """shape_key -> (form, out_features, in_features, layers of that shape) for the quantized layers of `plan`."""
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[str, int, int, int]] = {}
    for name, form in plan.items():
        if form != "dense":
            m = modules[name]
            key = shape_key(form, m.out_features, m.in_features, dtype)
            layers = shapes[key][3] + 1 if key in shapes else 1
            shapes[key] = (form, m.out_features, m.in_features, layers)
    return shapes


def serve_tied_embedding_from_head(model: nn.Module) -> bool:
    """Hold a tied embedding / LM head table once: where the head shares the embedding's weight
    (tie_word_embeddings) and holds an int8 copy made of the checkpoint's own Q8_0 codes (so
    `Int8Weight.rows` gives the file's exact values: lookups are bit for bit the dense table's), the
    int8 kernel serves the head at every batch size, the embedding lookup and the head's top-k
    refinement read rows from it, and the dense table is released (no oneDNN copy is made of it).

    Memory: Gemma 3's 262,144 x 640 table was held three times (dense bf16 335 MB, oneDNN-packed
    bf16 335 MB, int8 172 MB), now once; SmolLM2's 49,152 x 576 saves 113 MB. Speed: above the
    int8 kernel's calibrated limit (2 rows for Gemma's head) oneDNN's AMX matmul was faster: on the
    2-core dev VM the int8 head took 1.35x its time at 16 rows and 1.74x at 32 for Gemma's shape,
    0.97-1.09x for SmolLM2's (benchmarks/notes/memory.md). A table the loader deferred (never read
    dense: `deferrable_projections`) is served the same way and stays unread. Returns whether it
    released (or never needed) the dense table."""
    head = getattr(model, "lm_head", None)
    if type(head) is not Linear or not isinstance(head.quant, Int8Weight) or not head.quant.exact \
            or (head.weight.numel() == 0 and not head.weight_deferred):
        return False
    tables = [m for m in model.modules() if isinstance(m, VocabEmbedding) and m.weight is head.weight]
    if not tables:
        return False
    for table in tables:
        table.rows_from = head.quant.rows
    head.quant.max_rows = sys.maxsize
    head.weight.data = torch.empty(0, dtype=head.weight.dtype)  # the one Parameter both modules hold
    head.weight_deferred = False
    return True


def plan_quantization(model: nn.Module, mode: str, checkpoint=None) -> dict[str, str]:
    """Module name -> the form `quantize_model` gives it ("int4", "int8" or "dense"), for every `Linear`."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
    if mode == "none":
        return {}
    raw_types = _raw_type_reader(checkpoint)
    return {name: _choose(mode, name, [raw_types(s) for s in _shard_names(model, name, module)])
            for name, module in model.named_modules() if isinstance(module, Linear)}


def quantize_model(model: nn.Module, mode: str, checkpoint=None, max_rows: int = DEFAULT_MAX_ROWS,
                   kernels: dict[str, KernelChoice] | None = None, dtype: torch.dtype | None = None,
                   plan: dict[str, str] | None = None) -> Counter:
    """Attach packed weights to every `Linear` per `mode`. Returns how many layers got each form.
    `kernels` (shape_key -> KernelChoice, keyed at activation `dtype`: default the weights') names
    each shape's packed kernel and row limit; without an entry a layer gets ZILI_PACKED_KERNELS's
    kernel (default torch's) up to `max_rows`."""
    plan = plan_quantization(model, mode, checkpoint) if plan is None else plan
    counts: Counter = Counter()
    modules = dict(model.named_modules())
    with huge_page_weights() as arena:  # zili's packed layouts land in huge-page memory (cpu_quant.HugePageArena)
        trimmed = 0
        for name, form in plan.items():
            _quantize_layer(model, name, modules[name], form, checkpoint, max_rows, kernels, dtype, counts)
            # Packed weights outside the heap no longer reuse the heap space their packing temporaries
            # freed, which the allocator keeps: hand it back as the weights grow, not once at the end
            # (on SmolLM2 the load's peak was 689 MiB instead of 601 with the heap; ~600 with this).
            if arena is not None and arena.placed_bytes - trimmed >= HEAP_TRIM_EVERY_BYTES:
                current_platform().release_host_memory()
                trimmed = arena.placed_bytes
    return counts


def _quantize_layer(model: nn.Module, name: str, module: Linear, form: str, checkpoint, max_rows: int,
                    kernels: dict[str, KernelChoice] | None, dtype: torch.dtype | None, counts: Counter) -> None:
    choice = None
    if form != "dense" and kernels:
        choice = kernels.get(shape_key(form, module.out_features, module.in_features,
                                       dtype or module.weight.dtype))
    rows, isa = (choice.max_rows, choice.kernel) if choice is not None else (max_rows, None)
    if form == "int4":
        shards = _shard_names(model, name, module)
        types = [_raw_type_reader(checkpoint)(s) for s in shards]
        module.quant = Int4Weight(_group_quant(checkpoint, shards, types, module), rows, isa)
    elif form == "int8":
        shards = _shard_names(model, name, module)
        q8_0 = _q8_0_blocks(checkpoint, shards)
        module.quant = Int8Weight.from_q8_0(*q8_0, rows, isa) if q8_0 is not None else \
            Int8Weight(module.weight.detach(), rows, isa)
    counts[form] += 1


def _choose(mode: str, name: str, types: list) -> str:
    is_head = name == LM_HEAD
    if mode == "int8" or (mode == "int4" and is_head):
        return "int8"
    if mode == "int4":
        return "int4"
    # auto: follow the checkpoint
    if not types or any(t is None for t in types):
        return "dense"
    if all(t in INT4_GGUF_TYPES for t in types) and not is_head:
        return "int4"
    return "int8" if all(getattr(t, "name", "").startswith("Q") for t in types) else "dense"


def _group_quant(checkpoint, shards: list[str], types: list, module: Linear) -> GroupQuant:
    if types and all(t in INT4_GGUF_TYPES for t in types):
        parts = []
        for hf in shards:
            raw = checkpoint.raw_tensor(hf)
            parts.append(gguf_group_quant(raw.data, raw.qtype, raw.shape))
        return concat_group_quants(parts)
    return float_group_quant(module.weight.detach())


def _q8_0_blocks(checkpoint, shards: list[str]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8 codes [N, K] and float16 scales [N, K/32] of shards stored as GGUF Q8_0 (rows
    concatenated in shard order), or None unless every shard is Q8_0."""
    raws = _q8_0_raws(checkpoint, shards)
    if raws is None:
        return None
    codes, scales = [], []
    for raw in raws:
        n, k = raw.shape
        blocks = np.asarray(raw.data).reshape(n, k // 32, 34)
        scales.append(torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(n, k // 32)))
        codes.append(torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k)))
    if len(raws) == 1:
        return codes[0], scales[0]
    return torch.cat(codes), torch.cat(scales)


def _raw_type_reader(checkpoint):
    """hf name -> GGUF quant type, or None for float checkpoints / unknown names."""
    if checkpoint is None or not hasattr(checkpoint, "raw_tensor"):
        return lambda name: None

    def read(name: str):
        try:
            return checkpoint.raw_tensor(name).qtype
        except KeyError:
            return None
    return read


def _shard_names(model: nn.Module, module_name: str, module: Linear) -> list[str]:
    """The checkpoint tensor names whose rows make up this projection's weight."""
    if module_name == LM_HEAD and getattr(model.config, "tie_word_embeddings", False):
        return ["model.embed_tokens.weight"]
    prefix, _, leaf = module_name.rpartition(".")
    leaves = getattr(model, "fused_projections", {}).get(leaf, (leaf,))
    return [f"{prefix}.{hf}.weight" if prefix else f"{hf}.weight" for hf in leaves]


def _linears(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]


def quantized_bytes(model: nn.Module) -> int:
    return sum(m.quant.nbytes() for _, m in _linears(model) if m.quant is not None)


def set_quant_max_rows(model: nn.Module, max_rows: int) -> None:
    for _, m in _linears(model):
        if m.quant is not None:
            m.quant.max_rows = max_rows
