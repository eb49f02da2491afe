"""The tune cache: winners measured by `zili tune`, keyed by a device fingerprint.

One JSON file (default ~/.cache/zili/tune.json; ZILI_TUNE_CACHE moves it) holds, per device:

    {"version": 1, "devices": {"<fingerprint key>": {
        "fingerprint": {...what the platform reported...},
        "device": {"threads": 2, "attention_backend": "sdpa", "triton": {...}, "graph_batch_sizes": [...],
                   "quant_kernels": {"int4:960x576:bfloat16": {"kernel": "avx512", "max_rows": 16}, ...}},
        "models": {"<model key>": {"block_size": 32, "quant_max_rows": 8, "compiled_decode": true,
                                   "measured": {...}}}}}}

Device settings hold for any model on that device; model settings only for the model shapes,
dtype and quantization they were measured at. "quant_kernels" holds the packed-matmul choice per
layer shape (zili.layers.quant_calibration): written by `zili tune` and by the engine's start-up
calibration, so a model whose shapes were measured once starts without measuring again. A
different CPU model, flags, kernel level (ZILI_CPU_ISA), driver or torch gives a different
fingerprint key, so stale winners are never applied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zili import envs
from zili.platforms.interface import Platform

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
ENV_VAR = envs.ZILI_TUNE_CACHE.name
DEVICE_KEYS = ("threads", "attention_backend", "triton", "graph_batch_sizes", "quant_kernels")
MODEL_KEYS = ("block_size", "quant_max_rows", "compiled_decode")


def default_cache_path() -> Path:
    return envs.tune_cache_path()


def fingerprint_key(fingerprint: dict[str, Any]) -> str:
    blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def model_key(config: Any, dtype: Any, quantization: str) -> str:
    """Shapes, dtype and quantization: what the measured winners depend on (not the file's path)."""
    dtype = str(dtype).removeprefix("torch.")
    parts = [config.architecture, f"h{config.hidden_size}", f"i{config.intermediate_size}",
             f"l{config.num_hidden_layers}", f"q{config.num_attention_heads}", f"kv{config.num_key_value_heads}",
             f"d{config.head_dim}"]
    if getattr(config, "use_mla", False):
        parts.append(f"mla{config.kv_lora_rank}+{config.qk_rope_head_dim}")
    if getattr(config, "n_routed_experts", 0):
        parts.append(f"moe{config.n_routed_experts}x{config.moe_intermediate_size}")
    return "-".join(parts) + f"/{dtype}/{quantization}"


@dataclass
class TunedSettings:
    """What the cache says for one device, and for one model once `select_model` named it."""

    fingerprint: str
    path: Path
    device: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)

    def select_model(self, key: str) -> bool:
        self.model = dict(self.models.get(key, {}))
        return bool(self.model)

    def get(self, key: str) -> Any:
        return self.model.get(key, self.device.get(key))

    def describe(self) -> str:
        used = {**{k: self.device[k] for k in DEVICE_KEYS if k in self.device},
                **{k: self.model[k] for k in MODEL_KEYS if k in self.model}}
        if isinstance(used.get("quant_kernels"), dict):
            used["quant_kernels"] = f"{len(used['quant_kernels'])} layer shapes"
        return ", ".join(f"{k}={v}" for k, v in used.items()) or "nothing"


def load_tuning(platform: Platform, path: Path | None = None) -> TunedSettings | None:
    """The tuned settings for this device, or None (logged) when it was never tuned."""
    cache = TuneCache(path)
    tuned = cache.lookup(platform)
    if tuned is None:
        logger.info("tune cache %s: no entry for this device (%s, kernel level %s): threads and attention "
                    "backend from the platform; packed-matmul kernels calibrated now unless turned off (a few "
                    "seconds, then cached); `zili tune` measures everything and keeps it", cache.path,
                    platform.device_name(), platform.fingerprint().get("kernel_isa", "-"))
    return tuned


class TuneCache:
    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.data: dict[str, Any] = {"version": CACHE_VERSION, "devices": {}}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == CACHE_VERSION and isinstance(data.get("devices"), dict):
                    self.data = data
                else:
                    logger.warning("tune cache %s has another format version; ignored", self.path)
            except (OSError, ValueError) as e:
                logger.warning("tune cache %s is unreadable (%s); ignored", self.path, e)

    def lookup(self, platform: Platform) -> TunedSettings | None:
        """The device's settings, or None when this device was never tuned."""
        key = fingerprint_key(platform.fingerprint())
        entry = self.data["devices"].get(key)
        if entry is None:
            return None
        return TunedSettings(key, self.path, dict(entry.get("device", {})), dict(entry.get("models", {})))

    def merge_device_entries(self, platform: Platform, name: str, entries: dict[str, Any]) -> Path:
        """Add `entries` to the device setting `name` (a dict, e.g. "quant_kernels"), keeping the
        entries already there; the file is read again first, so another process's entries survive."""
        fresh = TuneCache(self.path)
        entry = fresh.data["devices"].get(fingerprint_key(platform.fingerprint()), {})
        current = entry.get("device", {}).get(name)
        merged = {**(current if isinstance(current, dict) else {}), **entries}
        path = fresh.store(platform, {name: merged})
        self.data = fresh.data
        return path

    def store(self, platform: Platform, device: dict[str, Any], model: str | None = None,
              model_settings: dict[str, Any] | None = None) -> Path:
        fp = platform.fingerprint()
        entry = self.data["devices"].setdefault(fingerprint_key(fp), {})
        entry["fingerprint"] = fp
        entry.setdefault("device", {}).update(device)
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        if model is not None:
            entry.setdefault("models", {})[model] = dict(model_settings or {})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True, default=str))
        tmp.replace(self.path)  # atomic: a concurrent reader sees the old file or the new one
        return self.path
