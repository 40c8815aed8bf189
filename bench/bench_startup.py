"""Start-up: seconds until `magiclens COMMAND --help` has printed, against `import magiclens`.

Each command runs in a fresh interpreter (`python -m magiclens COMMAND --help`), best of ROUNDS;
the baseline is the same interpreter importing only the package (`python -c "import magiclens"`),
best of ROUNDS, so the ratio is what reading the command's options costs over starting Python. A
command's options must load without torch or Beam: the goal is at most a second.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = 3
COMMANDS = ("mine", "instruct", "report", "export", "train", "evaluate", "index", "search", "serve", "convert-official")
GOAL_S = 1.0


def best_wall_time(argv: list[str]) -> float:
    """The shortest of ROUNDS wall times of `argv`, which must exit 0."""
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-500:]}")
    return min(times)


def run() -> list[dict]:
    baseline = best_wall_time([sys.executable, "-c", "import magiclens"])
    rows = []
    for command in COMMANDS:
        name = f"startup: magiclens {command} --help"
        try:
            value = best_wall_time([sys.executable, "-m", "magiclens", command, "--help"])
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            rows.append({"name": name, "unit": "s", "error": str(error), "goal": f"<= {GOAL_S:g} s"})
            continue
        rows.append({"name": name, "value": round(value, 3), "unit": "s", "baseline": round(baseline, 3),
                     "ratio": round(value / baseline, 2), "goal": f"<= {GOAL_S:g} s"})
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
