"""`zili bench extract` (zili.bench.extract): the generated workload is reproducible and its true
values are in its documents; field accuracy compares as documented; the command runs end to end on a
tiny model, speculation on and off, and records both."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tests.tiny_models import write_tiny_llama
from zili.bench.extract import example_cases, field_matches, generated_cases, score_outputs


def test_generated_cases_are_reproducible_and_hold_their_true_values():
    cases = generated_cases(10, seed=3)
    assert [c.document for c in cases] == [c.document for c in generated_cases(10, seed=3)]
    assert [c.document for c in cases] != [c.document for c in generated_cases(10, seed=4)]
    assert {c.name for c in cases} == {"invoice-en", "invoice-zh", "report-en", "report-zh", "contract-en"}
    for case in cases:
        assert set(case.truth) == set(case.schema["required"]), case.name
        for key, value in case.truth.items():
            if isinstance(value, float):
                shown = [f"{value:.2f}", f"{value}"]
            else:
                shown = [str(value)]
            if key == "period" and case.name == "report-zh":
                shown = [str(value)]
            assert any(s in case.document for s in shown), (case.name, key, value)


def test_field_matches():
    assert field_matches(540, 540.0) and field_matches(540.001, 540.0) and not field_matches(541, 540.0)
    assert not field_matches("540", 540.0) and not field_matches(True, 1)
    assert field_matches("  northwind   Bakery", "Northwind Bakery") and not field_matches("Northwind", "Northwind Bakery")
    assert not field_matches(None, "x")


def test_score_outputs_counts_fields_invalid_json_and_unfinished_forms():
    cases = generated_cases(3, seed=5)
    right = json.dumps(cases[0].truth)
    wrong = dict(cases[1].truth, **{next(iter(cases[1].truth)): "not this"})
    row = score_outputs(cases, [(right, "stop"), (json.dumps(wrong), "stop"), ('{"cut": ', "length")])
    n0, n1, n2 = (len(c.truth) for c in cases)
    assert row["fields"] == n0 + n1 + n2
    assert row["fields_correct"] == n0 + n1 - 1
    assert row["invalid_json"] == 1 and row["unfinished"] == 1 and row["num_requests"] == 3
    assert row["field_accuracy"] == (n0 + n1 - 1) / (n0 + n1 + n2)


def test_example_cases_read_forms_and_documents(tmp_path):
    (tmp_path / "inv").mkdir()
    (tmp_path / "inv" / "form.json").write_text(json.dumps({"type": "object"}))
    (tmp_path / "inv" / "a.txt").write_text("doc a")
    (tmp_path / "inv" / "b.txt").write_text("doc b")
    cases = example_cases(tmp_path)
    assert [(c.name, c.document, c.truth) for c in cases] == [("example-a", "doc a", None), ("example-b", "doc b", None)]


def test_bench_extract_command_records_speculation_on_and_off(tmp_path):
    from zili.bench.cli import bench_app

    model = write_tiny_llama(tmp_path / "tiny", max_position_embeddings=2048)  # byte tokens: long prompts
    out = tmp_path / "result.json"
    result = CliRunner().invoke(bench_app, [
        "extract", "--model", str(model), "-n", "2", "--examples", str(tmp_path / "none"), "--max-tokens", "24",
        "--dtype", "float32", "--enforce-eager", "--kv-cache-memory", "8MiB", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    runs = {r["engine"]: r for r in record["runs"]}
    assert set(runs) == {"zili", "zili+spec"}
    for run in runs.values():
        # An invoice (7 fields) and a financial summary (6).
        assert run["num_requests"] == 2 and run["fields"] == 13 and 0 <= run["field_accuracy"] <= 1
        assert run["output_tokens"] > 0
    assert runs["zili+spec"]["spec_decode"]["num_draft_tokens"] >= 0 and "spec_decode" not in runs["zili"]
    # Greedy: speculation changes the speed, never the text.
    assert runs["zili+spec"]["texts"] == runs["zili"]["texts"]
    assert record["summary"]["speculation_speedup"]["c1"] > 0
    # Jump-forward (on by default, in verify mode): its figures in every row.
    for run in runs.values():
        jf = run["jump_forward"]
        assert jf["mode"] == "verify" and jf["num_forced_draft_tokens"] >= jf["num_forced_tokens"] >= 0


def test_bench_extract_compares_jump_forward_modes(tmp_path):
    from zili.bench.cli import bench_app

    model = write_tiny_llama(tmp_path / "tiny", max_position_embeddings=2048)
    out = tmp_path / "result.json"
    result = CliRunner().invoke(bench_app, [
        "extract", "--model", str(model), "-n", "2", "--examples", str(tmp_path / "none"), "--max-tokens", "24",
        "--dtype", "float32", "--enforce-eager", "--kv-cache-memory", "8MiB", "--compare-jump-forward", "-o", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    runs = {r["engine"]: r for r in record["runs"]}
    assert set(runs) == {"zili+jf", "zili+jf-append", "zili"}
    assert runs["zili+jf"]["jump_forward"]["mode"] == "verify" and "jump_forward" not in runs["zili"]
    assert runs["zili+jf-append"]["jump_forward"]["mode"] == "append"
    # Verify mode changes the steps, never the text (greedy).
    assert runs["zili+jf"]["texts"] == runs["zili"]["texts"]
    assert runs["zili+jf"]["jump_forward"]["num_forced_tokens"] > 0
    assert runs["zili+jf"]["num_steps"] < runs["zili"]["num_steps"]
    summary = record["summary"]["jump_forward"]["c1"]
    assert summary["verify/off"]["output_throughput_ratio"] > 0 and summary["append/off"]["output_throughput_ratio"] > 0
