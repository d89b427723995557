#!/usr/bin/env python
"""Benchmark SOIT's dynamic mask head: the fused op vs the naive batched PyTorch head.

The naive head is the way the authors' inference code evaluates it, batched over instances
(the mask features repeated once per instance, grid_sample, the three projections as batched
matrix products). The fused op is ``solq_d2.layers.soit_dyn_attn``. Default problem: 100
instances on a 100 x 136 stride-8 map (an 800 x 1088 image), C = 8, 4 heads x 4 points.

Each (implementation, pass) case runs in a fresh subprocess: inputs are built, the peak-RSS mark
is reset, then one call (the warm-up) gives the peak extra memory (CPU: VmHWM - RSS before it;
CUDA: max_memory_allocated above the inputs), and the median of --reps further calls the time.
Cases alternate naive / fused --rounds times so that both see the same machine load; the ratios
use the per-implementation medians over rounds. The CPU other processes used during each timed
case is reported (the machines are shared).

    python tools/benchmark_soit_head.py                 # CPU, all threads
    python tools/benchmark_soit_head.py --device cuda   # GPU (time with CUDA events)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TARGET_FWD_SPEEDUP = 8.0
TARGET_MEM_RATIO = 1 / 50


# ------------------------------------------------------------------------------------------------
# The naive head (written from SOIT.md §6, as the authors' batched inference path computes it)


def naive_head(fmask, valid_hw, params, centers, num_heads=4, num_points=4):
    """Logits (N, H, W) of N instances of one image; every intermediate is materialised."""
    import math

    import torch
    import torch.nn.functional as F

    _, H, W, C = fmask.shape
    N, M, K = params.shape[0], num_heads, num_points
    MK = M * K
    hv, wv = int(valid_hw[0, 0]), int(valid_hw[0, 1])
    w_off = params[:, : 2 * MK * C].view(N, 2 * MK, C)
    b_off = params[:, 2 * MK * C : 2 * MK * C + 2 * MK]
    o = 2 * MK * C + 2 * MK
    w_att = params[:, o : o + MK * C].view(N, MK, C)
    b_att = params[:, o + MK * C : o + MK * C + MK]
    w_out = params[:, -C - 1 : -1]
    b_out = params[:, -1]

    feat = fmask[0].permute(2, 0, 1)  # (C, H, W)
    valid = torch.zeros(H, W, dtype=fmask.dtype, device=fmask.device)
    valid[:hv, :wv] = 1
    # relative sine PE per instance and pixel (cumsum positions / (valid + eps), 2*pi scale)
    ys = valid.cumsum(0)
    xs = valid.cumsum(1)
    ys = ys / (ys[-1:, :] + 1e-6)
    xs = xs / (xs[:, -1:] + 1e-6)
    dy = (ys[None] - centers[:, 1, None, None]) * 2 * math.pi  # (N, H, W)
    dx = (xs[None] - centers[:, 0, None, None]) * 2 * math.pi
    nf = C // 2
    freq = 10000 ** (2 * (torch.arange(nf, device=fmask.device) // 2) / nf)
    py = dy[:, None] / freq[None, :, None, None]
    px = dx[:, None] / freq[None, :, None, None]
    py = torch.stack([py[:, 0::2].sin(), py[:, 1::2].cos()], 2).flatten(1, 2)
    px = torch.stack([px[:, 0::2].sin(), px[:, 1::2].cos()], 2).flatten(1, 2)
    query = (feat[None] + torch.cat([py, px], 1)).flatten(2)  # (N, C, HW)

    off = torch.bmm(w_off, query) + b_off[:, :, None]  # (N, 2MK, HW)
    att = (torch.bmm(w_att, query) + b_att[:, :, None]).view(N, M, K, H * W).softmax(2)
    ref_x = (torch.arange(W, dtype=fmask.dtype, device=fmask.device) + 0.5) / W
    ref_y = (torch.arange(H, dtype=fmask.dtype, device=fmask.device) + 0.5) / H
    ref = torch.stack(torch.broadcast_tensors(ref_x[None, :], ref_y[:, None]), -1).view(H * W, 2)
    norm = torch.tensor([W, H], dtype=fmask.dtype, device=fmask.device)
    loc = ref[None, None] + off.view(N, MK, 2, H * W).transpose(2, 3) / norm  # (N, MK, HW, 2)
    grid = (2 * loc - 1).view(N, M, K, H * W, 2).transpose(2, 3).reshape(N * M, H * W, K, 2)
    value = (feat * valid)[None].repeat(N, 1, 1, 1).view(N * M, C // M, H, W)  # per instance
    samp = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    samp = samp.view(N, M, C // M, H * W, K) * att.permute(0, 1, 3, 2)[:, :, None]
    out = samp.sum(-1).reshape(N, C, H * W).transpose(1, 2).contiguous().relu()  # (N, HW, C)
    logits = torch.bmm(out, w_out[:, :, None])[..., 0] + b_out[:, None]
    return logits.view(N, H, W)


# ------------------------------------------------------------------------------------------------
# One case (runs in a subprocess)


def _inputs(args, device):
    import torch

    g = torch.Generator().manual_seed(0)
    C, M, K = args.channels, args.heads, args.points
    D = (C + 1) * (3 * M * K + 1)
    fmask = torch.randn(1, args.height, args.width, C, generator=g)
    params = torch.randn(args.instances, D, generator=g) * 0.5
    params[:, 2 * M * K * C : 2 * M * K * C + 2 * M * K] *= 3  # offsets of a few pixels
    centers = torch.rand(args.instances, 2, generator=g)
    valid_hw = torch.tensor([[args.height, args.width]])
    grad = torch.randn(args.instances, args.height, args.width, generator=g)
    return [t.to(device) for t in (fmask, valid_hw, params, centers, grad)]


def _rss_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu_ticks():
    """(total busy ticks of the machine, this process's ticks)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    busy = sum(int(x) for i, x in enumerate(fields) if i not in (3, 4))  # minus idle, iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])


def run_case(args):
    import torch

    from solq_d2.layers import soit_dyn_attn

    device = torch.device(args.device)
    fmask, valid_hw, params, centers, grad = _inputs(args, device)
    img_idx = torch.zeros(args.instances, dtype=torch.int64, device=device)
    train = args.case.endswith("train")
    if train:
        fmask.requires_grad_(True)
        params.requires_grad_(True)

    if args.case.startswith("naive"):

        def head():
            return naive_head(fmask, valid_hw, params, centers, args.heads, args.points)

    else:

        def head():
            return soit_dyn_attn(
                fmask,
                valid_hw,
                params,
                img_idx,
                centers,
                args.heads,
                args.points,
                impl="compiled",
            )

    def step():
        out = head()
        if train:
            fmask.grad = params.grad = None
            (out * grad).sum().backward()
        return out

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    # peak extra memory of one call
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step()
        sync()
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_kib("VmRSS")
        out = step()
        peak_mib = (_rss_kib("VmHWM") - base) / 1024
    result = {"peak_mib": peak_mib}
    if args.check:
        result["logits"] = out.detach().cpu().flatten()[:: max(1, out.numel() // 4096)].tolist()
        if train:
            result["grad_params"] = params.grad.cpu().flatten()[::97].tolist()
    del out

    times = []
    ncpu = os.cpu_count() or 1
    b0, o0 = _cpu_ticks()
    w0 = time.perf_counter()
    for _ in range(args.reps):
        sync()
        t0 = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            sync()
            ms = start.elapsed_time(end)
        else:
            step()
            ms = (time.perf_counter() - t0) * 1e3
        times.append(ms)
    # CPU time other processes used during the timed calls, in cores (coarse: clock ticks)
    wall = time.perf_counter() - w0
    b1, o1 = _cpu_ticks()
    foreign = ((b1 - b0) - (o1 - o0)) / os.sysconf("SC_CLK_TCK") / max(wall, 1e-9)
    result.update(
        ms=statistics.median(times),
        ms_min=min(times),
        foreign_cores=max(0.0, foreign),
        cores=ncpu,
    )
    print("RESULT " + json.dumps(result))


# ------------------------------------------------------------------------------------------------
# Driver


def _spawn(args, case, check=False):
    cmd = [
        sys.executable, __file__, "--case", case, "--device", args.device,
        "--instances", str(args.instances), "--height", str(args.height),
        "--width", str(args.width), "--channels", str(args.channels),
        "--heads", str(args.heads), "--points", str(args.points),
        "--reps", str(args.reps if not case.startswith("naive") else args.naive_reps),
    ]
    if check:
        cmd.append("--check")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise SystemExit(f"case {case} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--instances", type=int, default=100)
    p.add_argument("--height", type=int, default=100)
    p.add_argument("--width", type=int, default=136)
    p.add_argument("--channels", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--points", type=int, default=4)
    p.add_argument("--reps", type=int, default=7, help="timed calls of the fused op per case")
    p.add_argument("--naive-reps", type=int, default=5, help="timed calls of the naive head")
    p.add_argument("--rounds", type=int, default=2, help="alternating naive/fused rounds")
    p.add_argument("--json", type=str, default="", help="also write the results here")
    p.add_argument("--case", default="", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return run_case(args)

    import torch

    from solq_d2.layers import _ext

    print(
        f"SOIT dynamic head: N={args.instances} instances on a {args.height}x{args.width} map, "
        f"C={args.channels}, {args.heads} heads x {args.points} points, device={args.device}"
    )
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, op: {_ext.op_report().get('soit_dyn_attn')}"
    )
    # correctness first: the naive head and the fused op agree
    for case in ("train",):
        a = _spawn(args, f"naive_{case}", check=True)
        b = _spawn(args, f"fused_{case}", check=True)
        dl = max(abs(x - y) for x, y in zip(a["logits"], b["logits"]))
        scale = max(abs(x) for x in a["grad_params"]) or 1.0
        dg = max(abs(x - y) for x, y in zip(a["grad_params"], b["grad_params"])) / scale
        print(f"check: max |logit diff| {dl:.2e}, max grad_params diff / max |grad| {dg:.2e}")
        if dl > 1e-3 or dg > 1e-3:
            raise SystemExit("the naive head and the fused op disagree; not benchmarking")

    results = {c: [] for c in ("naive_fwd", "fused_fwd", "naive_train", "fused_train")}
    for _ in range(args.rounds):
        for case in results:
            results[case].append(_spawn(args, case))

    def med(case, key):
        return statistics.median(r[key] for r in results[case])

    print()
    print(f"{'case':<14}{'median ms':>12}{'min ms':>10}{'peak MiB':>11}{'foreign cores':>15}")
    for case, runs in results.items():
        print(
            f"{case:<14}{med(case, 'ms'):>12.1f}{min(r['ms_min'] for r in runs):>10.1f}"
            f"{med(case, 'peak_mib'):>11.1f}{max(r['foreign_cores'] for r in runs):>15.2f}"
        )
    fwd_speed = med("naive_fwd", "ms") / med("fused_fwd", "ms")
    train_speed = med("naive_train", "ms") / med("fused_train", "ms")
    fwd_mem = med("fused_fwd", "peak_mib") / max(med("naive_fwd", "peak_mib"), 1e-9)
    train_mem = med("fused_train", "peak_mib") / max(med("naive_train", "peak_mib"), 1e-9)
    print()
    met = "MET" if fwd_speed >= TARGET_FWD_SPEEDUP else "NOT MET"
    print(f"forward:          fused is {fwd_speed:.1f}x faster "
          f"(target >= {TARGET_FWD_SPEEDUP:g}x) -> {met}")
    met = "MET" if fwd_mem <= TARGET_MEM_RATIO else "NOT MET"
    print(f"forward memory:   fused peak = 1/{1 / max(fwd_mem, 1e-9):.0f} of naive "
          f"(target <= 1/{1 / TARGET_MEM_RATIO:.0f}) -> {met}")
    print(f"forward+backward: fused is {train_speed:.1f}x faster, "
          f"peak = 1/{1 / max(train_mem, 1e-9):.0f} of naive")
    if args.json:
        summary = {
            "args": vars(args),
            "results": results,
            "forward_speedup": fwd_speed,
            "train_speedup": train_speed,
            "forward_mem_ratio": fwd_mem,
            "train_mem_ratio": train_mem,
        }
        Path(args.json).write_text(json.dumps(summary, indent=1))

if __name__ == "__main__":
    main()
