"""`zili tune` and the tune cache: keyed by device fingerprint, read by the engine at start (explicit
settings and --no-tune-cache win), written by a real (tiny) tuning run; the graph ladder's padding."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from tests.tiny_models import write_tiny_llama
from zili.platforms.cpu import CpuPlatform
from zili.platforms.tuning import TuneCache, fingerprint_key, load_tuning, model_key


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def cache_path(tmp_path, monkeypatch):
    path = tmp_path / "tune.json"
    monkeypatch.setenv("ZILI_TUNE_CACHE", str(path))
    threads = torch.get_num_threads()
    yield path
    torch.set_num_threads(threads)


class OtherCpu(CpuPlatform):
    def fingerprint(self):
        return {**super().fingerprint(), "torch": "0.0-other"}


def test_cache_round_trip_and_fingerprint(cache_path):
    cpu = CpuPlatform()
    assert load_tuning(cpu) is None  # nothing tuned yet
    TuneCache().store(cpu, {"threads": 1, "attention_backend": "sdpa"}, "m1", {"block_size": 32})
    tuned = load_tuning(cpu)
    assert tuned.device == {"threads": 1, "attention_backend": "sdpa"}
    assert tuned.select_model("m1") and tuned.get("block_size") == 32 and tuned.get("threads") == 1
    assert not tuned.select_model("m2") and tuned.get("block_size") is None
    assert load_tuning(OtherCpu()) is None  # another torch (driver, flags...): another key
    assert fingerprint_key(cpu.fingerprint()) != fingerprint_key(OtherCpu().fingerprint())
    data = json.loads(cache_path.read_text())
    assert data["devices"][tuned.fingerprint]["fingerprint"]["flags"] == cpu.fingerprint()["flags"]
    cache_path.write_text("{not json")
    assert load_tuning(cpu) is None  # unreadable: ignored, defaults


def _tiny_key(tiny_dir):
    from zili.models.hf_config import model_config_from_hf

    cfg = model_config_from_hf(json.loads((tiny_dir / "config.json").read_text()))
    return model_key(cfg, torch.float32, "auto")


def test_engine_reads_the_cache_and_logs_it(tiny_dir, cache_path, caplog):
    from zili.config import EngineConfig
    from zili.engine.builder import build_engine

    TuneCache().store(CpuPlatform(), {"threads": 1, "attention_backend": "sdpa"}, _tiny_key(tiny_dir),
                      {"block_size": 8})
    base = dict(model=str(tiny_dir), dtype="float32", kv_cache_memory=2**20)
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="zili.engine.builder"):
        engine = build_engine(EngineConfig(**base))
    assert engine.config.block_size == 8 and engine.kv_cache.block_size == 8
    assert torch.get_num_threads() == 1
    assert "tune cache" in caplog.text and "block_size=8" in caplog.text and "threads=1" in caplog.text
    assert build_engine(EngineConfig(**base, block_size=4)).config.block_size == 4  # explicit wins
    assert build_engine(EngineConfig(**base, threads=2)) and torch.get_num_threads() == 2
    untuned = build_engine(EngineConfig(**base, use_tune_cache=False))  # --no-tune-cache
    assert untuned.config.block_size == EngineConfig.block_size
    with pytest.raises(ValueError, match="does not run on cpu"):
        build_engine(EngineConfig(**base, attention_backend="triton"))


def test_engine_stays_eager_where_tune_measured_compiling_slower(tiny_dir, cache_path, monkeypatch, caplog):
    from zili.config import EngineConfig
    from zili.engine.builder import build_engine_parts

    monkeypatch.delenv("ZILI_ENFORCE_EAGER", raising=False)  # the suite's default; here the cache decides
    TuneCache().store(CpuPlatform(), {}, _tiny_key(tiny_dir), {"compiled_decode": False})
    with caplog.at_level(logging.INFO, logger="zili.engine.builder"):
        parts = build_engine_parts(EngineConfig(model=str(tiny_dir), dtype="float32", kv_cache_memory=2**20))
    assert parts.compile_seconds is None and parts.executor.compiled_decode is None
    assert "measured the compiled step no faster" in caplog.text


def test_tune_command_end_to_end(tiny_dir, cache_path):
    """A real (tiny, fast) tuning run through the typer command; the engine then uses the winners."""
    import typer
    from typer.testing import CliRunner

    from zili.config import EngineConfig
    from zili.engine.builder import build_engine
    from zili.tune import tune

    app = typer.Typer()
    app.command("tune")(tune)
    app.command("other")(lambda: None)  # two commands: `tune` stays a subcommand, as in zili.cli
    report = cache_path.parent / "report.json"
    result = CliRunner().invoke(app, ["tune", str(tiny_dir), "--dtype", "float32", "--quantization", "int4",
                                      "--block-sizes", "16,32", "--repeats", "1", "--decode-tokens", "4",
                                      "--batches", "2", "--no-measure-compile", "--json", str(report)])
    assert result.exit_code == 0, result.output
    full = json.loads(report.read_text())
    # Both CPU attention backends (torch reference, zili's C++ kernel) were timed; the winner is kept.
    assert full["device"]["attention_backend"] in ("sdpa", "cpp") and full["device"]["threads"] in (1, 2)
    assert full["model"]["block_size"] in (16, 32) and 0 <= full["model"]["quant_max_rows"] <= 64
    assert full["comparison"]["b2"]["default_tok_s"] > 0 and full["comparison"]["b2"]["speedup"] > 0
    timings = full["measurements"]["attention_ms_per_layer"]
    assert set(timings) == {"sdpa/bs16", "sdpa/bs32", "cpp/bs16", "cpp/bs32"}
    # Every packed-matmul candidate timed per layer shape and row count: each kernel level this CPU
    # executes, torch's kernel and dense.
    from zili.kernels import cpu_isa

    kernels = full["measurements"]["quant_kernels_us"]
    assert kernels and all(k.startswith("Int4Weight:") or k.startswith("Int8Weight:") for k in kernels)
    for entry in kernels.values():
        assert set(entry["us"]) == {*cpu_isa.executable_levels(), "torch", "dense"}
        assert entry["winner"] in entry["us"] and all(t > 0 for t in entry["us"].values())
    engine = build_engine(EngineConfig(model=str(tiny_dir), dtype="float32", quantization="int4",
                                       kv_cache_memory=2**20))
    assert full["model"]["block_size"] == engine.config.block_size
    rows = {m.quant.max_rows for m in engine.runner.model.modules() if getattr(m, "quant", None) is not None}
    assert rows == {full["model"]["quant_max_rows"]}  # tuned, not re-calibrated at load
    # The packed kernel chosen per layer shape (zili's level or torch's) is the one each layer runs.
    from zili.layers.quant_calibration import shape_key

    chosen = full["device"]["quant_kernels"]
    assert chosen and all(c["kernel"] in (cpu_isa.selected(), "torch") for c in chosen.values())
    for m in engine.runner.model.modules():
        if getattr(m, "quant", None) is not None:
            key = shape_key("int4" if type(m.quant).__name__ == "Int4Weight" else "int8", m.out_features,
                            m.in_features, torch.float32)
            assert (m.quant.isa or "torch") == chosen[key]["kernel"]


def test_tune_rejects_bad_options(tiny_dir, cache_path):
    import typer
    from typer.testing import CliRunner

    from zili.tune import tune

    app = typer.Typer()
    app.command("tune")(tune)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["tune", str(tiny_dir), "--block-sizes", "16,x"])
    assert result.exit_code != 0 and "comma-separated positive integers" in result.output
    assert not cache_path.exists()


def test_graph_ladder_and_padding():
    """The CPU-testable part of decode-graph capture: ladder sizes and how a batch is padded."""
    from zili.engine.cuda_graphs import DecodeGraphs, _StaticInputs, batch_ladder, graph_size_for
    from zili.kernels.attention import AttentionMetadata

    ladder = batch_ladder(40)
    assert ladder == [1, 2, 4, 8, 16, 24, 32, 40]
    assert [graph_size_for(b, ladder) for b in (1, 3, 17, 40, 41)] == [1, 4, 24, 40, None]
    # a batch of 3 in the size-4 graph: its slots and lengths are what the eager path's metadata says,
    # the fourth row is padding (slot -1: no cache write; length 0)
    staged = _StaticInputs(4, max_blocks=4, device=torch.device("cpu"))
    meta = AttentionMetadata.build([1, 1, 1], [4, 8, 7], [[3], [4, 5], [6, 7]], 4)
    staged.fill_from_host([7, 8, 9], [3, 7, 6], [[3], [4, 5], [6, 7]], 4)
    assert staged.slot_mapping.tolist() == meta.slot_mapping.tolist() + [-1]
    assert staged.seq_lens.tolist() == [4, 8, 7, 0] and staged.input_ids.tolist() == [7, 8, 9, 0]
    assert staged.positions.tolist() == [3, 7, 6, 0]
    assert staged.block_tables[:3, :2].tolist() == meta.block_tables.tolist() and staged.block_tables[:, 2:].sum() == 0
    padded = staged.meta(4)
    assert padded.is_decode_only and padded.num_seqs == 4
    # a smaller next step re-pads the rows it leaves
    staged.fill_from_host([5], [0], [[9, 1, 2]], 4)
    assert staged.slot_mapping.tolist() == [36, -1, -1, -1] and staged.seq_lens.tolist() == [1, 0, 0, 0]
    assert staged.block_tables.tolist() == [[9, 1, 2, 0]] + [[0] * 4] * 3 and staged.input_ids.tolist() == [5, 0, 0, 0]
    with pytest.raises(ValueError, match="does not support graph capture"):
        DecodeGraphs(torch.nn.Identity(), [], CpuPlatform(), ladder, 4, 4, torch.device("cpu"))
