"""Peak resident memory of a ``convcore`` command, as the kernel counts it."""
from __future__ import annotations

import subprocess
import sys

# Runs its arguments as a command and prints that child's peak RSS (KiB). A child forked
# straight from a large process (pytest, after many tests) starts out counting the
# parent's pages in its ru_maxrss; forked from this small launcher it does not.
LAUNCHER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss_mb(*args: object) -> float:
    """Run ``convcore ARGS`` in a child; its peak resident memory in MiB (the kernel's
    ``ru_maxrss``, so nothing of this process counts). Fails on errors."""
    r = subprocess.run([sys.executable, "-c", LAUNCHER, sys.executable, "-m", "convcore",
                        *map(str, args)], capture_output=True, text=True)
    code, kib = r.stdout.split()
    assert r.returncode == 0 and code == "0", r.stderr
    return int(kib) / 1024
