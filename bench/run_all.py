"""Run every benchmark script under bench/ in turn and print their tables.

    make bench      (or .venv/bin/python bench/run_all.py [name ...])
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = [p for p in sorted(HERE.glob("*.py")) if p.name not in ("harness.py", "run_all.py")]

if __name__ == "__main__":
    wanted = set(sys.argv[1:])
    for script in SCRIPTS:
        if wanted and script.stem not in wanted:
            continue
        print(f"### {script.stem}\n\n`{sys.executable} {script}`\n", flush=True)
        subprocess.run([sys.executable, str(script)], check=False)
