"""Threads on a shared CPU: does a run collapse when other work shares its cores?

``geoupsample upsample`` (gsjbu, default settings) of the pipeline benchmark's 4096 x 4096 scene
(``benchmarks/_data``, made by ``benchmarks/pipeline.py``) is timed, wall clock, in fresh
processes:

- ``alone``: one run, the machine otherwise idle;
- ``two``: two runs side by side, each with the default threads (the CPUs the process may
  use); each should take about twice as long as alone (a fair share), not many times that;
- ``two --threads 1``: the same with ``--threads 1`` each (one core each);
- ``busy``: one run beside ``--hogs`` busy-looping processes (a shared node at load ~3.5 on
  2 cores with the default 2 hogs plus the run), and the same with ``--threads 1``.

Each case is repeated ``-n`` times; medians are printed with the ratio to ``alone``. Run it
alone on the machine::

    python benchmarks/threads.py -n 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"


def command(out: str, threads: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "geoupsample.cli", "upsample", str(DATA / "lowres_4096.tif"),
           str(DATA / "guide_4096.tif"), "-o", out, "-q"]  # fmt: skip
    return cmd + (["--threads", str(threads)] if threads else [])


def timed(runs: list[list[str]]) -> list[float]:
    """Start ``runs`` together; the wall seconds of each."""
    start = time.perf_counter()
    procs = [subprocess.Popen(r, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for r in runs]
    ends = []
    for p in procs:
        _, err = p.communicate()
        if p.returncode:
            raise SystemExit(err.decode()[-2000:])
        ends.append(time.perf_counter() - start)
    return ends


def hog(stop: multiprocessing.Event) -> None:  # type: ignore[valid-type]
    while not stop.is_set():
        sum(i * i for i in range(10000))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--repeats", type=int, default=3)
    ap.add_argument("--hogs", type=int, default=2)
    args = ap.parse_args()
    if not (DATA / "guide_4096.tif").exists():
        raise SystemExit("run benchmarks/pipeline.py first: it writes benchmarks/_data")
    with tempfile.TemporaryDirectory() as d:
        outs = [os.path.join(d, f"o{i}.tif") for i in range(2)]
        timed([command(outs[0], None)])  # warm the caches (Numba, the files)
        cases: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            cases.setdefault("alone", []).append(timed([command(outs[0], None)])[0])
            for threads in (None, 1):
                label = f"two{' --threads 1' if threads else ''} (each)"
                cases.setdefault(label, []).extend(
                    timed([command(o, threads) for o in outs]))
            for threads in (None, 1):
                stop = multiprocessing.Event()
                hogs = [multiprocessing.Process(target=hog, args=(stop,))
                        for _ in range(args.hogs)]  # fmt: skip
                for h in hogs:
                    h.start()
                time.sleep(0.5)
                label = f"busy, {args.hogs} hogs{' --threads 1' if threads else ''}"
                cases.setdefault(label, []).append(timed([command(outs[0], threads)])[0])
                stop.set()
                for h in hogs:
                    h.join()
    alone = statistics.median(cases["alone"])
    cores = len(os.sched_getaffinity(0))
    print(f"geoupsample upsample gsjbu 4096^2 on {cores} cores, median of {args.repeats}:")
    for label, secs in cases.items():
        med = statistics.median(secs)
        print(f"  {label:28s} {med:6.1f} s  ({med / alone:4.2f}x alone)  "
              f"[{', '.join(f'{s:.1f}' for s in secs)}]")


if __name__ == "__main__":
    main()
