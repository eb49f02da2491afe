"""HF checkpoint directories: config.json, *.safetensors (sharded or not), tokenizer.json."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from zili.config import ModelConfig
from zili.weights.errors import UnsupportedModelError
from zili.weights.fp8 import BlockFP8Dequantizer

if TYPE_CHECKING:
    from zili.tokenizer import Tokenizer

# Buffers some exporters save that are not parameters (recomputed from the config).
_KEEP_FP32_SUFFIXES = ("e_score_correction_bias",)
_SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{path} is not valid JSON: {e}") from e


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


class HFCheckpoint:
    """A directory in Hugging Face layout.

    `parse_config` turns config.json into a ModelConfig (`zili.models.hf_config.model_config_from_hf`,
    passed in by `zili.models.loader.open_checkpoint`); without it `config()` is unavailable."""

    format = "hf"

    def __init__(self, path: str | Path, parse_config: Callable[[dict[str, Any]], ModelConfig] | None = None) -> None:
        self.path = Path(path)
        self._parse_config = parse_config
        self.hf_config = _read_json(self.path / "config.json")
        if not self.hf_config:
            raise UnsupportedModelError(f"{self.path}: config.json is missing or empty.")

    def __repr__(self) -> str:
        return f"HFCheckpoint({str(self.path)!r})"

    def config(self) -> ModelConfig:
        return self._config

    @cached_property
    def _config(self) -> ModelConfig:
        if self._parse_config is None:
            raise UnsupportedModelError(f"{self.path}: opened without a config parser; open it with "
                                        "zili.models.loader.open_checkpoint to read its ModelConfig.")
        try:
            return self._parse_config(self.hf_config)
        except UnsupportedModelError:
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise UnsupportedModelError(f"{self.path / 'config.json'}: {e}") from e

    # ---- tensors ----

    def weight_files(self) -> list[Path]:
        """The safetensors files, from the shard index when there is one."""
        index = _read_json(self.path / "model.safetensors.index.json")
        if index:
            names = sorted(set(index.get("weight_map", {}).values()))
            files = [self.path / n for n in names]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise UnsupportedModelError(f"{self.path}: shards listed in the index are missing: {missing}")
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise UnsupportedModelError(f"{self.path}: no *.safetensors files.")
        return files

    def tensors(self, dtype: torch.dtype = torch.float32,
                keep: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, tensor in `dtype`) for every parameter, shard by shard; block-scaled fp8 weights come
        dequantized, routing biases in float32. `keep`: only the names it accepts are read (the
        others are skipped before anything is read or dequantized)."""
        files = self.weight_files()
        dequantize = BlockFP8Dequantizer(files, self.hf_config)  # fp8 + weight_scale_inv -> dtype
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if name.endswith(_SKIPPED_SUFFIXES) or dequantize.is_scale(name) or \
                            (keep is not None and not keep(name)):
                        continue
                    t = dequantize(name, f.get_tensor(name), dtype)
                    if not t.is_floating_point() or name.endswith(_KEEP_FP32_SUFFIXES):
                        yield name, t  # routing biases decide expert choice: rounding them changes it
                    else:
                        yield name, t.to(dtype)

    # ---- tokenizer ----

    @cached_property
    def _tokenizer_config(self) -> dict[str, Any]:
        return _read_json(self.path / "tokenizer_config.json")

    def chat_template(self) -> str | None:
        jinja_file = self.path / "chat_template.jinja"
        if jinja_file.is_file():
            return jinja_file.read_text(encoding="utf-8")
        template = self._tokenizer_config.get("chat_template")
        if template is None:
            template = _read_json(self.path / "chat_template.json").get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    def tokenizer(self) -> "Tokenizer":
        return self._tokenizer

    @cached_property
    def _tokenizer(self) -> "Tokenizer":
        from zili.tokenizer import Tokenizer

        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise UnsupportedModelError(
                f"{self.path}: tokenizer.json is missing; zili reads fast-tokenizer files only "
                "(save one with transformers: AutoTokenizer.from_pretrained(...).save_pretrained(dir))."
            )
        generation = _read_json(self.path / "generation_config.json")
        eos_ids = _as_id_list(generation.get("eos_token_id")) + _as_id_list(self.hf_config.get("eos_token_id"))
        tok = Tokenizer.from_file(file, self._tokenizer_config, extra_eos_token_ids=eos_ids,
                                  chat_template=self.chat_template())
        # Without bos/eos in tokenizer_config.json, fall back to the ids in the model's configs.
        if tok.bos_token is None:
            bos_ids = _as_id_list(generation.get("bos_token_id")) or _as_id_list(self.hf_config.get("bos_token_id"))
            if bos_ids:
                tok.bos_token, tok.bos_token_id = tok.id_to_token(bos_ids[0]), bos_ids[0]
        if tok.eos_token is None and tok.eos_token_ids:
            tok.eos_token_id = tok.eos_token_ids[0]
            tok.eos_token = tok.id_to_token(tok.eos_token_id)
        return tok
