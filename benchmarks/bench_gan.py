"""Time the StyleGAN2 networks: G forward, G forward+backward, D forward+backward.

Prints a markdown table (for BENCHMARKS.md). Each config runs in a fresh subprocess so the
peak RSS column belongs to that config alone. Timings are the median (or, with `--stat min`,
the minimum) of `--repeat` runs after `--warmup` runs; on a shared CPU they are noisy, so
compare numbers from the same run, and prefer `--stat min` when other jobs share the cores.

    python benchmarks/bench_gan.py                 # CPU, all configs but the largest
    python benchmarks/bench_gan.py --full          # + 128 px, channel_base 16384 / max 512
    python benchmarks/bench_gan.py --device cuda --batch 32
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time

import torch

# name -> (resolution, channel_base, channel_max, z_dim = w_dim)
CONFIGS = {
    "tiny": (32, 1024, 64, 64),
    "demo64": (64, 2048, 128, 128),
    "demo64-256": (64, 4096, 256, 256),
    "128-4096": (128, 4096, 256, 512),
    "128-16384": (128, 16384, 512, 512),
}
FULL_ONLY = {"128-16384"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, warmup: int, repeat: int, stat: str = "median") -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return min(times) if stat == "min" else statistics.median(times)


def run_config(name: str, args: argparse.Namespace) -> dict:
    """Build G and D for one config and time them; returns a row of the table."""
    from cxredit.models.stylegan2 import Discriminator, Generator, count_params

    if args.threads:
        torch.set_num_threads(args.threads)
    res, cbase, cmax, zdim = CONFIGS[name]
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    G = Generator(z_dim=zdim, w_dim=zdim, img_resolution=res, channel_base=cbase,
                  channel_max=cmax, mapping_layers=args.mapping_layers).to(device)
    D = Discriminator(img_resolution=res, channel_base=cbase, channel_max=cmax).to(device)
    if args.fused_modconv != "auto":
        G.synthesis.fused_modconv = args.fused_modconv == "1"
    n = args.batch
    z = torch.randn(n, zdim, device=device, generator=gen)
    real = torch.randn(n, 1, res, res, device=device, generator=gen).clamp(-1, 1)

    def g_fwd():
        with torch.no_grad():
            G(z, generator=gen)

    def g_fwd_bwd():
        G.zero_grad(set_to_none=True)
        G(z, generator=gen).square().mean().backward()

    def d_fwd_bwd():
        D.zero_grad(set_to_none=True)
        D(real).sum().backward()

    t = {k: _time(f, device, args.warmup, args.repeat, args.stat)
         for k, f in [("g_fwd", g_fwd), ("g_fb", g_fwd_bwd), ("d_fb", d_fwd_bwd)]}
    if args.train_step:
        t["train"] = _train_step_time(res, cbase, cmax, zdim, args, device)
    row = dict(name=name, res=res, cbase=cbase, cmax=cmax, zdim=zdim, g_params=count_params(G),
               d_params=count_params(D), **t)
    row["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        row["gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def _train_step_time(res: int, cbase: int, cmax: int, zdim: int, args: argparse.Namespace,
                     device: torch.device) -> float:
    """One full training iteration of `GanTrainer` (ADA at p=0.2), lazy R1 and path-length
    phases amortised over their intervals: t_G + t_D + t_pl / pl_interval + t_r1 / r1_interval
    + t_ema (timing each phase keeps the big configs affordable)."""
    import tempfile

    import numpy as np
    import pandas as pd

    from cxredit.config import preset
    from cxredit.data.store import ImageStore, StoreWriter
    from cxredit.train.gan import GanTrainer

    n = args.batch * 2
    with tempfile.TemporaryDirectory() as d:
        plan = pd.DataFrame({"path": [f"x{i}" for i in range(n)],
                             "patient_id": [f"p{i}" for i in range(n)]})
        w = StoreWriter(d + "/s", plan, res)
        w.images[:] = np.random.default_rng(0).integers(0, 256, (n, res, res), np.uint8)
        w.state[:] = 1
        w.finish()
        cfg = preset("paper128").replace(resolution=res, channel_base=cbase, channel_max=cmax,
                                         z_dim=zdim, w_dim=zdim, batch=args.batch, aug="fixed",
                                         aug_p=0.2, mapping_layers=args.mapping_layers)
        tr = GanTrainer(cfg, ImageStore(d + "/s"), None, device=device, progress=False)
        reals = tr.real_batch()
        phases = {"g": tr.g_step, "d": lambda: tr.d_step(reals), "pl": tr.pl_step,
                  "r1": lambda: tr.r1_step(reals), "ema": tr.ema_update}
        t = {k: _time(f, device, 1, max(1, args.repeat // 2), args.stat)
             for k, f in phases.items()}
    return (t["g"] + t["d"] + t["pl"] / cfg.pl_interval + t["r1"] / cfg.r1_interval
            + t["ema"])


def _worker(name: str, args: argparse.Namespace, queue: mp.Queue) -> None:
    queue.put(run_config(name, args))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="statistic over the repeats")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--mapping-layers", type=int, default=8)
    p.add_argument("--fused-modconv", choices=["auto", "1", "0"], default="auto",
                   help="modulated conv path for G (auto = the model default)")
    p.add_argument("--full", action="store_true", help="also run the 128 px 16384/512 config")
    p.add_argument("--configs", nargs="*", default=None, choices=list(CONFIGS))
    p.add_argument("--train-step", action="store_true",
                   help="also time one full training iteration (lazy regs amortised)")
    args = p.parse_args(argv)

    names = args.configs or [k for k in CONFIGS if args.full or k not in FULL_ONLY]
    ctx = mp.get_context("spawn")
    rows = []
    for name in names:
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker, args=(name, args, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
        print(f"done {name}", file=sys.stderr, flush=True)

    n = args.batch
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"batch {n}, {args.stat} of {args.repeat} after {args.warmup} warmup, "
          f"fused_modconv {args.fused_modconv}, {platform.machine()} {os.cpu_count()} CPUs"
          + (f", {torch.cuda.get_device_name(0)}" if args.device.startswith("cuda") else ""))
    print()
    mem = "peak GPU MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    step = " train step s (img/s) |" if args.train_step else ""
    print(f"| config | R | cbase/cmax | z=w | G params | D params | G fwd s (img/s) "
          f"| G fwd+bwd s (img/s) | D fwd+bwd s (img/s) |{step} {mem} |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("---|" if step else ""))
    keys = ("g_fwd", "g_fb", "d_fb") + (("train",) if args.train_step else ())
    for r in rows:
        cells = [f"{r[k]:.3f} ({n / r[k]:.1f})" for k in keys]
        m = r.get("gpu_mb", r["rss_mb"])
        print(f"| {r['name']} | {r['res']} | {r['cbase']}/{r['cmax']} | {r['zdim']} "
              f"| {r['g_params'] / 1e6:.2f} M | {r['d_params'] / 1e6:.2f} M | "
              + " | ".join(cells) + f" | {m:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
