"""Peak resident memory of a command and all its child processes (a DVC stage's script and its workers),
sampled from /proc every 0.1 s as proportional set size (PSS: a page shared by forked workers counts once in
the sum), split into anonymous memory (heap, tensors: what must fit in RAM) and file-backed memory (pages of
memory-mapped datasets: page cache the kernel evicts under pressure).

    python -m benchmarks.stage_memory -- python -m stages.teachers --dataset ravdess --prepared ... [...]

Linux only. Prints the peaks of the tree's summed PSS, anonymous and file-backed PSS, and the exit status.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            frontier += kids
    return found


def _status_kib(pid: int) -> dict[str, int]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Pss_Anon", "Pss_File"):
                values[key] = int(rest.split()[0])
    except OSError:
        pass
    return values


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", nargs=argparse.REMAINDER)
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peaks = {"Pss": 0, "Pss_Anon": 0, "Pss_File": 0}
    while proc.poll() is None:
        totals = {key: 0 for key in peaks}
        for pid in [proc.pid, *_children(proc.pid)]:
            for key, value in _status_kib(pid).items():
                if key in totals:
                    totals[key] += value
        for key in peaks:
            peaks[key] = max(peaks[key], totals[key])
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    print(f"exit {proc.returncode} after {seconds:.1f} s; peak summed over the process tree: PSS "
          f"{peaks['Pss'] / 1024:.0f} MB, anonymous {peaks['Pss_Anon'] / 1024:.0f} MB, file-backed "
          f"{peaks['Pss_File'] / 1024:.0f} MB", file=sys.stderr)
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
