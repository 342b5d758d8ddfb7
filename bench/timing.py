"""One command under GNU time (`/usr/bin/time -v`): its wall time, peak RSS, stdout and CPU time.

    timed(command, env=None) -> Timed(wall_s, peak_rss_bytes, stdout, cpu_s)

The whole process is measured (start-up, imports and loading included), and the peak RSS counts
the pages of memory-mapped files it touched. A failing command ends the bench with its stderr's tail.
"""

import re
import subprocess
from typing import NamedTuple

# "Elapsed (wall clock) time (h:mm:ss or m:ss): 1:02.34": hours only past an hour
WALL = re.compile(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)")
PEAK_RSS_KB = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")
CPU_KINDS = ("User", "System")


class Timed(NamedTuple):
    wall_s: float
    peak_rss_bytes: int
    stdout: str
    cpu_s: float  # user + system


def timed(command, env=None):
    """Run `command` (a list; items made str) under /usr/bin/time -v, capturing its output."""
    result = subprocess.run(["/usr/bin/time", "-v", *map(str, command)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(map(str, command))} failed:\n{result.stderr[-2000:]}")
    return parse(result.stderr, result.stdout)


def parse(report, stdout=""):
    """The Timed of GNU time's -v `report` (the command's stderr ends with it)."""
    hours, minutes, seconds = WALL.search(report).groups()
    wall = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
    rss_kb = int(PEAK_RSS_KB.search(report).group(1))
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", report).group(1)) for kind in CPU_KINDS)
    return Timed(wall, rss_kb * 1024, stdout, cpu)
