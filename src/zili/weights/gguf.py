"""GGUF checkpoints (llama.cpp's single-file format): metadata -> ModelConfig, tensors -> HF names.

The header (metadata key/values and the tensor index) is parsed here directly: `gguf.GGUFReader`
builds a numpy view for every part of every field and takes ~3 s on a 49k-token vocabulary, while a
plain sequential scan takes a fraction of that. Tensor data is a read-only memory map of the file;
`gguf.quants` does the dequantization and `gguf.constants` supplies the type tables, and the tests
check this reader against `GGUFReader` field by field.

Layout facts this module relies on (GGUF v2/v3, little-endian):
    magic "GGUF", u32 version, u64 tensor_count, u64 kv_count,
    kv_count x (string key, u32 value_type, value),  an array value is (u32 item_type, u64 n, items),
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset),
    padding to `general.alignment` (default 32), then the tensor data; offsets are relative to it.
A tensor's dims are innermost first (ne0 = the row length), the reverse of torch's order.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from gguf.quants import dequantize

from zili.config import ModelConfig
from zili.weights.errors import UnsupportedModelError

if TYPE_CHECKING:
    from zili.tokenizer import Tokenizer

SUPPORTED_QUANT_TYPES = tuple(
    GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q5_K", "Q6_K")
)

_DEFAULT_ALIGNMENT = 32
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2", GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4", GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "<u8", GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8",
}


def supported_quant_type_names() -> str:
    return ", ".join(t.name for t in SUPPORTED_QUANT_TYPES)


# --------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    qtype: int  # a GGMLQuantizationType value (kept as int: the file may name a type we do not know)
    shape: tuple[int, ...]  # torch order, outermost first
    offset: int  # absolute byte offset of the data in the file

    @property
    def type_name(self) -> str:
        try:
            return GGMLQuantizationType(self.qtype).name
        except ValueError:
            return f"unknown type {self.qtype}"

    @property
    def row_bytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self.qtype)]
        return self.shape[-1] // block * type_size

    @property
    def num_rows(self) -> int:
        return math.prod(self.shape[:-1])


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]  # in file order
    data_offset: int


class _Cursor:
    """Sequential little-endian reads over a buffer."""

    def __init__(self, buf: memoryview | bytes, pos: int = 0) -> None:
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        start, self.pos = self.pos, self.pos + n
        return bytes(self.buf[start:self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        vtype = GGUFValueType(vtype)
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type, count = GGUFValueType(self.unpack("<I")), self.unpack("<Q")
            if item_type in _NUMPY_DTYPES:
                dtype = np.dtype(_NUMPY_DTYPES[item_type])
                items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return items.tolist()
            return [self.value(item_type) for _ in range(count)]
        return self.unpack(_SCALAR_FORMATS[vtype])


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Parse a GGUF file's metadata and tensor index (no tensor data is read)."""
    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            return _parse_header(buf, path)
        except (struct.error, ValueError, IndexError) as e:
            if isinstance(e, UnsupportedModelError):
                raise
            raise UnsupportedModelError(f"{path} is not a readable GGUF file ({e}).") from e
        finally:
            buf.release()


def _parse_header(buf: memoryview, path: Path) -> GGUFHeader:
    if bytes(buf[:4]) != b"GGUF":
        raise UnsupportedModelError(f"{path} is not a GGUF file (no 'GGUF' magic at its start).")
    cur = _Cursor(buf, 4)
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise UnsupportedModelError(
            f"{path}: GGUF version {version} is not supported (supported: 2, 3, little-endian). "
            "Re-convert it with a current llama.cpp `convert_hf_to_gguf.py`."
        )
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.unpack("<I"))
    infos: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.unpack("<Q") for _ in range(cur.unpack("<I"))]
        qtype, offset = cur.unpack("<I"), cur.unpack("<Q")
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = {name: GGUFTensorInfo(name, qtype, shape, data_offset + offset) for name, shape, qtype, offset in infos}
    return GGUFHeader(version, metadata, tensors, data_offset)


# --------------------------------------------------------------------------------------------
# Names: GGUF -> HF, per model family
# --------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's block tensor names for the Llama-shaped decoder (llama.cpp's LLM_TENSOR_* names).
LLAMA_BLOCK_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors that carry no parameter of their own (rope_freqs is folded into ModelConfig.rope_scaling).
_SKIPPED_TENSORS = ("rope_freqs.weight",)


@dataclass(frozen=True)
class GGUFLayout:
    """One model family's GGUF dialect: how its files map onto ModelConfig and HF tensor names.

    Families declare theirs next to their model class and list it in `zili.models.registry`; this
    module reads files with it and names no family itself.

    architecture: the files' `general.architecture` (llama.cpp's name, e.g. "deepseek2").
    family / hf_architecture: what ModelConfig.architecture / .hf_architecture become.
    block_names: GGUF block tensor leaf -> HF name under `model.layers.N.` ("attn_q" ->
        "self_attn.q_proj"); a key with a suffix ("exp_probs_b.bias") maps that exact tensor to a
        full HF tail ("mlp.gate.e_score_correction_bias").
    rotary_permuted: q/k rows are stored in llama.cpp's interleaved rotary order (its converter
        permutes them for Llama) and are put back in HF's order on reading.
    config_fields: family-specific ModelConfig fields from the metadata, applied over the
        Llama-shaped ones this module reads (may also replace them, e.g. head_dim for MLA).
    """

    architecture: str
    family: str
    hf_architecture: str
    block_names: Mapping[str, str] = field(default_factory=lambda: dict(LLAMA_BLOCK_NAMES))
    rotary_permuted: bool = False
    config_fields: Callable[["GGUFCheckpoint"], dict[str, Any]] | None = None
    # (HF name, dequantized float32 tensor) -> the HF tensor, for families whose converter changes
    # values (llama.cpp stores Gemma's norm weights plus one). Raw blocks are not transformed.
    tensor_transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None

    def hf_name(self, gguf_name: str) -> str | None:
        """The HF parameter name of a GGUF tensor; None when the name is not one this family has."""
        if gguf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[gguf_name]
        m = _BLOCK_RE.fullmatch(gguf_name)
        if m is None:
            return None
        layer, leaf, suffix = m.groups()
        if f"{leaf}.{suffix}" in self.block_names:
            return f"model.layers.{layer}.{self.block_names[f'{leaf}.{suffix}']}"
        if leaf in self.block_names:
            return f"model.layers.{layer}.{self.block_names[leaf]}.{suffix}"
        return None


def rotary_unpermute_rows(num_rows: int, num_heads: int) -> np.ndarray:
    """Row order that turns llama.cpp's rotary layout of a q/k projection back into HF's.

    llama.cpp stores each head's rows as interleaved (x0, y0, x1, y1, ...) pairs; HF keeps the two
    rotary halves apart (x0, x1, ..., y0, y1, ...). hf_rows = gguf_rows[perm].
    """
    head_dim = num_rows // num_heads
    return np.arange(num_rows).reshape(num_heads, head_dim // 2, 2).transpose(0, 2, 1).reshape(-1)


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawTensor:
    """A tensor's stored blocks, untouched except that q/k rows are in HF order.

    `data` is uint8 [rows, bytes_per_row] for every type (F32/F16/BF16 included); rows are whole
    quant blocks, so reordering rows is exact. `shape` is the torch shape of the decoded tensor.
    """

    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFCheckpoint:
    """One .gguf file: ModelConfig, HF-named tensors, the raw blocks, the tokenizer.

    `layout` is the file's model-family dialect (`zili.models.loader.open_checkpoint` picks it from
    the family table). Without one, the metadata, tensor index and tokenizer are readable, but
    config / tensors are not (UnsupportedModelError)."""

    format = "gguf"

    def __init__(self, path: str | Path, layout: GGUFLayout | None = None) -> None:
        self.path = Path(path)
        self.header = read_gguf_header(self.path)
        self.metadata = self.header.metadata
        check_gguf_supported(self.header, self.path)
        self.architecture = str(self.metadata.get("general.architecture"))
        self.layout = layout
        self._names: dict[str, str] = {}  # hf name -> gguf name
        if layout is None:
            return
        if layout.architecture != self.architecture:
            raise UnsupportedModelError(f"{self.path}: GGUF architecture {self.architecture!r} read with the "
                                        f"{layout.architecture!r} layout")
        for name in self.header.tensors:
            if name in _SKIPPED_TENSORS:
                continue
            target = layout.hf_name(name)
            if target is None:
                raise UnsupportedModelError(
                    f"{self.path}: tensor {name!r} has no place in a {self.architecture} model "
                    f"(supported tensors: token_embd, output_norm, output, "
                    f"blk.N.{{{', '.join(layout.block_names)}}})."
                )
            self._names[target] = name

    def _need_layout(self) -> GGUFLayout:
        if self.layout is None:
            raise UnsupportedModelError(
                f"{self.path}: opened without its model family's GGUF layout; open it with "
                "zili.models.loader.open_checkpoint to read its config and tensors.")
        return self.layout

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, architecture={self.architecture!r})"

    @cached_property
    def _file(self) -> np.memmap:
        return np.memmap(self.path, dtype=np.uint8, mode="r")

    def release_file_pages(self) -> None:
        """Unmap from this process the file pages read so far (madvise MADV_DONTNEED on the read-only
        mapping; they stay in the OS page cache, and a view read again faults them back in unchanged).
        Without it every tensor's stored blocks stay resident until the whole load ends, on top of
        the packed weights made from them: the default model's 94 MiB file set the load's peak RSS.
        A no-op before the first tensor is read and where madvise is missing."""
        mapped = self.__dict__.get("_file")
        raw = getattr(mapped, "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
            raw.madvise(mmap.MADV_DONTNEED)

    def _meta(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    # ---- config ----

    def config(self) -> ModelConfig:
        return self._config

    @cached_property
    def _config(self) -> ModelConfig:
        layout, meta = self._need_layout(), self.metadata
        hidden = int(self._meta("embedding_length"))
        heads = int(self._meta("attention.head_count"))
        kv_heads = self._uniform(self._meta("attention.head_count_kv", heads), "attention.head_count_kv")
        head_dim = int(self._meta("attention.key_length", hidden // heads))
        embd = self.header.tensors["token_embd.weight"]
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = int(self._meta("vocab_size", len(tokens) if tokens else embd.shape[0]))
        theta = float(self._meta("rope.freq_base", 10000.0))
        context = int(self._meta("context_length", 4096))
        eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id") if k in meta]
        fields: dict[str, Any] = dict(
            architecture=layout.family,
            hidden_size=hidden,
            intermediate_size=self._uniform(self._meta("feed_forward_length"), "feed_forward_length"),
            num_hidden_layers=int(self._meta("block_count")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=vocab,
            head_dim=head_dim,
            max_position_embeddings=context,
            rope_theta=theta,
            rope_scaling=self._rope_scaling(int(self._meta("rope.dimension_count", head_dim)), theta),
            rms_norm_eps=float(self._meta("attention.layer_norm_rms_epsilon", 1e-6)),
            tie_word_embeddings="output.weight" not in self.header.tensors,
            attention_bias="blk.0.attn_q.bias" in self.header.tensors,
            o_proj_bias="blk.0.attn_output.bias" in self.header.tensors,
            qk_norm="blk.0.attn_q_norm.weight" in self.header.tensors,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=list(dict.fromkeys(int(i) for i in eos_ids)),
            pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
            hf_architecture=layout.hf_architecture,
        )
        if layout.config_fields is not None:
            fields.update(layout.config_fields(self))
        return ModelConfig(**fields)

    def rope_scaling(self, rotary_dim: int) -> dict[str, Any] | None:
        """The HF-style rope scaling dict the metadata describes for `rotary_dim` rotated dimensions
        (None: plain RoPE); UnsupportedModelError for a kind zili does not run."""
        return self._rope_scaling(rotary_dim, float(self._meta("rope.freq_base", 10000.0)))

    def meta(self, key: str, default: Any = None) -> Any:
        """The metadata value `<architecture>.<key>` (e.g. "attention.kv_lora_rank"), or `default`."""
        return self._meta(key, default)

    def _uniform(self, value: Any, key: str) -> int:
        """Per-layer arrays (some converters write one) must hold a single value for a dense model."""
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UnsupportedModelError(
                    f"{self.path}: {self.architecture}.{key} differs between layers ({sorted(set(value))}); "
                    "zili supports models whose layers all have the same shape."
                )
            value = value[0]
        if value is None:
            raise UnsupportedModelError(f"{self.path}: metadata key {self.architecture}.{key} is missing.")
        return int(value)

    def _rope_scaling(self, head_dim: int, theta: float) -> dict[str, Any] | None:
        kind = self._meta("rope.scaling.type")
        factor = self._meta("rope.scaling.factor", self._meta("rope.scale_linear"))
        if kind is None and factor is not None:
            kind = "linear"
        if "rope_freqs.weight" in self.header.tensors:
            if kind not in (None, "none"):
                raise UnsupportedModelError(f"{self.path}: rope_freqs together with rope scaling {kind!r}")
            return self._llama3_scaling(head_dim, theta)
        if kind in (None, "none") or factor in (None, 1.0):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            scaling: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
            original = self._meta("rope.scaling.original_context_length")
            if original is not None:
                scaling["original_max_position_embeddings"] = int(original)
            for key in ("beta_fast", "beta_slow"):
                if (v := self._meta(f"rope.scaling.yarn_{key}")) is not None:
                    scaling[key] = float(v)
            return scaling
        raise UnsupportedModelError(
            f"{self.path}: rope scaling type {kind!r} is not supported (supported: none, linear, yarn, "
            "llama3 via rope_freqs)."
        )

    def _llama3_scaling(self, head_dim: int, theta: float) -> dict[str, Any]:
        """Recover Llama 3.1-style scaling parameters from the per-frequency factors llama.cpp stores.

        The file keeps only the resulting factors, so try the parameters Meta ships (low 1, high 4,
        original context 8192, factor = the largest stored factor) and accept them only when they
        reproduce every stored factor.
        """
        stored = self._dequantize(self.header.tensors["rope_freqs.weight"]).double().flatten()
        params = {"rope_type": "llama3", "factor": float(round(stored.max().item(), 4)), "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        expected = llama3_rope_factors(head_dim, theta, params)
        if expected.shape != stored.shape or not torch.allclose(expected, stored, rtol=1e-3, atol=1e-4):
            raise UnsupportedModelError(
                f"{self.path}: its rope_freqs tensor does not match Llama 3 rope scaling with factor "
                f"{params['factor']}, low 1, high 4, original context 8192; other rope_freqs are not supported."
            )
        return params

    # ---- tensors ----

    def _rows(self, info: GGUFTensorInfo) -> np.ndarray:
        self.release_file_pages()  # the tensors read before this one are packed or copied by now
        start = info.offset
        return self._file[start:start + info.num_rows * info.row_bytes].reshape(info.num_rows, info.row_bytes)

    def _row_order(self, hf: str, info: GGUFTensorInfo) -> np.ndarray | None:
        if not self._need_layout().rotary_permuted:
            return None
        if ".self_attn.q_proj." in hf:
            return rotary_unpermute_rows(info.shape[0], self._config.num_attention_heads)
        if ".self_attn.k_proj." in hf:
            return rotary_unpermute_rows(info.shape[0], self._config.num_key_value_heads)
        return None

    def _dequantize(self, info: GGUFTensorInfo) -> torch.Tensor:
        return dequantize_rows(self._rows(info), GGMLQuantizationType(info.qtype), info.shape)

    def raw_tensor(self, name: str) -> RawTensor:
        """The stored blocks of the parameter `name` (an HF name), rows in HF order."""
        info = self._info(name)
        rows = self._rows(info)
        order = self._row_order(name, info)
        if order is not None:
            # Rows of a matrix are whole blocks; a vector (a bias) is reordered element by element.
            rows = np.ascontiguousarray(rows.reshape(len(order), -1)[order]).reshape(rows.shape)
        return RawTensor(GGMLQuantizationType(info.qtype), info.shape, rows)

    def _info(self, name: str) -> GGUFTensorInfo:
        self._need_layout()
        if name not in self._names:
            raise KeyError(f"{self.path} has no tensor for parameter {name!r}")
        return self.header.tensors[self._names[name]]

    def tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One parameter, dequantized to `dtype`, q/k rows in HF order.

        A matrix is dequantized DEQUANT_CHUNK_ELEMENTS at a time into its `dtype` result: `gguf`'s
        numpy dequantization makes several float32 temporaries of its input, which for a 262k-token
        embedding (Gemma 3) meant gigabytes of transient peak memory that glibc then kept."""
        info = self._info(name)
        order = self._row_order(name, info)
        transform = self._need_layout().tensor_transform
        if len(info.shape) == 2 and info.shape[0] * info.shape[1] > DEQUANT_CHUNK_ELEMENTS:
            rows, (n, k) = self._rows(info), info.shape
            out = torch.empty((n, k), dtype=dtype)
            step = max(1, DEQUANT_CHUNK_ELEMENTS // k)
            for start in range(0, n, step):
                picked = rows[order[start:start + step]] if order is not None else rows[start:start + step]
                part = dequantize_rows(picked, GGMLQuantizationType(info.qtype), (len(picked), k))
                out[start:start + len(picked)] = transform(name, part) if transform is not None else part
            return out
        t = self._dequantize(info)
        if order is not None:
            t = t[torch.from_numpy(order)]
        if transform is not None:
            t = transform(name, t)
        return t.to(dtype)

    def tensors(self, dtype: torch.dtype = torch.float32, skip: Container[str] = (),
                placeholder: torch.Tensor | None = None,
                keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor dequantized to `dtype`) for every parameter, in file order; the names in
        `skip` come with `placeholder` instead, unread (their layer is packed from the codes later).
        `keep`: only the names it accepts come at all (the others are neither read nor dequantized)."""
        self._need_layout()
        for name in self._names:
            if keep is not None and not keep(name):
                continue
            if name in skip:
                assert placeholder is not None, "skip needs a placeholder"
                yield name, placeholder
            else:
                yield name, self.tensor(name, dtype)

    # ---- tokenizer ----

    def chat_template(self) -> str | None:
        return self.metadata.get("tokenizer.chat_template")

    def tokenizer(self) -> "Tokenizer":
        return self._tokenizer

    @cached_property
    def _tokenizer(self) -> "Tokenizer":
        from zili.tokenizer import Tokenizer

        return Tokenizer.from_gguf_fields(self.metadata, source=str(self.path))


# Elements of a matrix dequantized at once (`GGUFCheckpoint.tensor`): 4 MiB of float32 per chunk.
DEQUANT_CHUNK_ELEMENTS = 1 << 20


def dequantize_rows(rows: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Stored blocks (uint8 [rows, bytes_per_row]) -> float32 tensor of `shape`."""
    if qtype not in SUPPORTED_QUANT_TYPES:
        raise UnsupportedModelError(
            f"quant type {qtype.name} is not supported; supported quant types: {supported_quant_type_names()}"
        )
    if qtype == GGMLQuantizationType.F32:
        values = np.array(rows).view(np.float32)  # a copy: a memory-mapped file is read-only
    else:
        values = dequantize(rows, qtype)
    return torch.from_numpy(values.reshape(shape))


def llama3_rope_factors(head_dim: int, theta: float, params: dict[str, Any]) -> torch.Tensor:
    """Per-frequency divisors of Llama 3 rope scaling (what llama.cpp stores as rope_freqs)."""
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    original = params["original_max_position_embeddings"]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    out = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < original / high, torch.ones_like(out), out)
    return torch.where(wavelen > original / low, torch.full_like(out, factor), out)


def check_gguf_supported(header: GGUFHeader, path: Path) -> str:
    """The file's `general.architecture`, after checking its tensors' quant types and required tensors
    (UnsupportedModelError if not). Whether the architecture is supported is the family table's
    question (`zili.models.registry.gguf_family`)."""
    arch = header.metadata.get("general.architecture")
    bad = [info for info in header.tensors.values() if info.qtype not in SUPPORTED_QUANT_TYPES]
    if bad:
        kinds = sorted({info.type_name for info in bad})
        raise UnsupportedModelError(
            f"{path}: tensor quant type {', '.join(kinds)} is not supported (e.g. tensor {bad[0].name!r}); "
            f"supported quant types: {supported_quant_type_names()}. Pick a GGUF quantized with one of "
            "these (llama.cpp `llama-quantize` can requantize)."
        )
    for needed in ("token_embd.weight",):
        if needed not in header.tensors:
            raise UnsupportedModelError(f"{path}: required tensor {needed!r} is missing.")
    return str(arch)
