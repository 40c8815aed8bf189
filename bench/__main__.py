"""`make bench`: run every bench/bench_*.py module, write bench/results.json, print a table.

Each module has `run() -> list[dict]`; a row is {name, value, unit, baseline, ratio, goal}, where
`baseline` is a raw rate measured in the same run on the same data and `ratio = value / baseline`
(for memory rows, `ratio` may compare two runs of our own code; `goal` says which way is good).
A row that could not be measured has `error` (why) and no value; the command then exits 1.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _number(value: object, spec: str) -> str:
    return "" if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    header = f"{'benchmark':<48}{'value':>12} {'unit':<16}{'baseline':>12}{'ratio':>9}  goal"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['name']:<48}{_number(row.get('value'), '.4g'):>12} {row.get('unit', ''):<16}"
            f"{_number(row.get('baseline'), '.4g'):>12}{_number(row.get('ratio'), '.3f'):>9}  {row.get('goal', '')}"
        )
        if row.get("error"):
            print(f"    not measured: {row['error']}")


def main(argv: list[str]) -> int:
    wanted = set(argv)
    modules = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if m.name.startswith("bench_"))
    rows: list[dict] = []
    for name in modules:
        if wanted and name not in wanted and name.removeprefix("bench_") not in wanted:
            continue
        started = time.perf_counter()
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        module = importlib.import_module(f"bench.{name}")
        module_rows = module.run()
        for row in module_rows:
            row.setdefault("module", name)
        rows.extend(module_rows)
        print(f"[bench] {name} done in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    (HERE / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows)
    print(f"\nwritten: {HERE / 'results.json'}")
    return 1 if any(row.get("error") for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
