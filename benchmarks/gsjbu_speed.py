"""GSJBU speed and memory (BENCHMARKS.md §1): fit + render time and peak RSS over imports.

Case A: 224 x 224 guide, 3 bands, 16 x 16 LR grid (scale 14), C = 384, fit 50 steps + render.
Case B: 1024 x 1024 guide, 4 bands, 64 x 64 LR grid (scale 16), C = 384.
Case S: 1024 x 1024 guide, 4 bands, 512 x 512 LR grid (scale 2), C = 6: the six 20 m bands of
Sentinel-2 brought to 10 m, guided by the four 10 m bands. Small scales are the costly ones per
pixel: a cell per 4 guide pixels, each with its own kernel and 49 neighbours.

Each repeat runs in a fresh process so that peak RSS belongs to that case alone; the figures
printed are medians over the repeats.

    python benchmarks/gsjbu_speed.py                  # all cases, 3 repeats, CPU
    python benchmarks/gsjbu_speed.py --case A -n 5    # one case
    python benchmarks/gsjbu_speed.py --device cuda    # on a GPU (fused Triton kernels)
    GEOUPSAMPLE_BACKEND=torch python benchmarks/gsjbu_speed.py --device cuda  # torch on GPU
    GEOUPSAMPLE_TUNE_MALLOC=0 python benchmarks/gsjbu_speed.py   # glibc's default malloc
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASES = {
    "A": {"hr": 224, "lr": 16, "bands": 3, "channels": 384},
    "B": {"hr": 1024, "lr": 64, "bands": 4, "channels": 384},
    "S": {"hr": 1024, "lr": 512, "bands": 4, "channels": 6},
}


def run_once(case: str, device: str, iters: int, sample: float) -> dict:
    """One fit + render in this process; returns seconds and MB."""
    import resource
    import time

    import numpy as np
    import psutil
    import torch

    import geoupsample as gu
    from geoupsample.core import backend

    tuned = gu.tune_allocator()  # as the CLI does; GEOUPSAMPLE_TUNE_MALLOC=0 to compare
    cfg = CASES[case]
    rng = np.random.default_rng(0)
    hr, lr = cfg["hr"], cfg["lr"]
    # A smooth random "image" with edges: blocky noise, bilinearly enlarged, plus fine noise.
    base = torch.from_numpy(rng.random((1, cfg["bands"], hr // 8, hr // 8)).astype(np.float32))
    guide = torch.nn.functional.interpolate(base, size=(hr, hr), mode="bilinear")[0]
    guide += 0.05 * torch.rand(guide.shape, generator=torch.Generator().manual_seed(1))
    x = torch.randn(cfg["channels"], lr, lr)
    if device == "cuda":
        guide, x = guide.cuda(), x.cuda()
        # Warm-up on the very same shapes: compiles every Triton kernel variant the timed run
        # needs (kernels are specialised on dtypes, block sizes and some strides) and loads
        # cuBLAS, so that no compile lands in the timings.
        gu.fit(guide, (lr, lr), iters=2, device=device, sample=sample).render(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    kernels = gu.fit(guide, (lr, lr), iters=iters, device=device, sample=sample)
    t1 = time.perf_counter()
    out = kernels.render(x)
    if device == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "fit_s": t1 - t0,
        "render_s": t2 - t1,
        "total_s": t2 - t0,
        "peak_rss_over_imports_mb": (peak_kb * 1024 - rss0) / 2**20,
        "output_mb": out.numel() * out.element_size() / 2**20,
        "final_loss": kernels.loss_history[-1] if kernels.loss_history else None,
        "backend": backend.name(kernels.params),
        "malloc_tuned": tuned,
    }
    if device == "cuda":
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), action="append")
    ap.add_argument("-n", "--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--sample", type=float, default=1 / 16, help="fraction of loss pixels per step")
    ap.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cases = args.case or sorted(CASES)
    if args.once:
        print(json.dumps(run_once(cases[0], args.device, args.iters, args.sample)))
        return
    for case in cases:
        runs = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--once", "--case", case, "--device", args.device,
                   "--iters", str(args.iters), "--sample", str(args.sample)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{done.stderr[-3000:]}")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        med = {
            k: statistics.median(r[k] for r in runs)
            for k in runs[0]
            if isinstance(runs[0][k], (int, float))
        }
        cfg = CASES[case]
        print(
            f"case {case} ({cfg['hr']}^2, {cfg['bands']} bands, {cfg['lr']}^2 LR, "
            f"C={cfg['channels']},"
            f" {args.iters} steps, sample={args.sample}, {args.device}, {runs[0]['backend']} path,"
            f" malloc {'tuned' if runs[0]['malloc_tuned'] else 'default'}),"
            f" median of {len(runs)}: "
            + (
                f"fit {1e3 * med['fit_s']:.1f} ms + render {1e3 * med['render_s']:.1f} ms = "
                f"{1e3 * med['total_s']:.1f} ms; "
                if args.device.startswith("cuda")
                else f"fit {med['fit_s']:.2f} s + render {med['render_s']:.2f} s = "
                f"{med['total_s']:.2f} s; "
            )
            + f"peak RSS over imports {med['peak_rss_over_imports_mb']:.0f} MB "
            f"(output {med['output_mb']:.0f} MB)"
            + (f"; GPU peak {med['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in med else "")
        )


if __name__ == "__main__":
    main()
