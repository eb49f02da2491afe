"""Result records: one JSON file per benchmark invocation under benchmarks/results/
(relative to the current directory unless a command's --output says otherwise).

A record holds the command, the code (git commit), the machine, the configuration, the cost basis,
one row per measured run (`runs`) and the medians / ratios derived from them (`summary`).
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from zili.bench.cost import CostBasis, cost_figures
from zili.bench.machine import git_info, load_average, machine_info

SCHEMA = "zili-bench/1"


def default_results_dir() -> Path:
    """Where records go when no --output is given: `benchmarks/results/` under the current directory
    (the repository root, when run from a checkout)."""
    return Path.cwd() / "benchmarks" / "results"


def command_line(argv: list[str] | None = None, program: str = "zili bench") -> str:
    """The command as a user would type it: `zili bench <sub> ...` (or `program <sub> ...`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["bench"]:
        args = args[1:]
    return f"{program} " + shlex.join(args)


def new_record(kind: str, config: dict[str, Any], basis: CostBasis, argv: list[str] | None = None,
               program: str = "zili bench") -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command_line(argv, program),
        "git": git_info(),
        "machine": machine_info(),
        "config": config,
        "cost_basis": basis.to_dict(),
        "runs": [],
        "summary": {},
    }


def with_cost(row: dict[str, Any], basis: CostBasis, output_key: str = "output_throughput",
              input_key: str = "input_throughput") -> dict[str, Any]:
    row["cost"] = cost_figures(row.get(output_key), row.get(input_key), basis)
    return row


def finish_record(record: dict[str, Any]) -> dict[str, Any]:
    record["machine"]["load_average_end"] = load_average()
    return record


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:40] or "run"


def write_record(record: dict[str, Any], out: Path | None = None, label: str | None = None) -> Path:
    """Write to `out` (a .json path or a directory; default benchmarks/results/)."""
    finish_record(record)
    out = Path(out) if out else default_results_dir()
    if out.suffix != ".json":
        stamp = record["created"].replace("-", "").replace(":", "")
        out = out / f"{stamp}-{record['kind']}{'-' + slug(label) if label else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, sort_keys=False) + "\n")
    return out


def load_records(results_dir: Path | None = None) -> list[tuple[Path, dict[str, Any]]]:
    """Every record under the directory, oldest first; files of another schema are skipped."""
    results_dir = Path(results_dir) if results_dir else default_results_dir()
    out = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            out.append((path, data))
    out.sort(key=lambda pr: (pr[1].get("created", ""), pr[0].name))
    return out
