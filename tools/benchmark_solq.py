#!/usr/bin/env python
"""SOLQ inference benchmark: one image through the released-model architecture
(configs/SOLQ/solq_R_50_50ep.yaml: R50, d 384, 300 queries), compiled deformable attention
(``MODEL.MSDA.IMPL auto``) vs the PyTorch path (``pytorch``), same weights and input.

Each implementation runs in its own subprocess so that its peak memory (max RSS on CPU,
``torch.cuda.max_memory_allocated`` on CUDA) is its own. Prints per-implementation latency
(median of ``--runs`` after one warm-up), peak memory, the speed ratio and the largest output
difference between the two::

    python tools/benchmark_solq.py --height 800 --width 1333 --runs 3 [--device cuda]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def _build(device: str, impl: str):
    import torch
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from solq_d2.config import add_solq_d2_config

    cfg = get_cfg()
    add_solq_d2_config(cfg)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg.merge_from_file(os.path.join(root, "configs", "SOLQ", "solq_R_50_50ep.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.MSDA.IMPL", impl])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _worker(args) -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = _build(args.device, args.impl)
    g = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, args.height, args.width), generator=g, dtype=torch.uint8)
    inputs = [{"image": image}]
    cuda = args.device.startswith("cuda")
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    raw = {}
    hook = model.transformer.register_forward_hook(lambda m, i, o: raw.__setitem__("t", o))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    times, cpu_times = [], []
    with torch.no_grad():
        for i in range(args.runs + 1):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0, c0 = time.perf_counter(), time.process_time()
            out = model(inputs)[0]["instances"]
            if cuda:
                torch.cuda.synchronize()
            if i > 0:  # the first run is a warm-up
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
    hook.remove()
    t = raw["t"]
    torch.save(
        {
            "hs": t.hs.cpu(),
            "memory": t.memory.cpu(),
            "pred_boxes": t.pred_boxes.cpu(),
            "scores": out.scores.cpu(),
            "labels": out.pred_classes.cpu(),
            "masks": out.pred_masks.cpu(),
        },
        args.save,
    )
    result = {
        "impl": args.impl,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "latency_s": statistics.median(times),
        "latencies_s": times,
        "cpu_s": statistics.median(cpu_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_build_mb": rss_model,
    }
    if cuda:
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--impl", default="", help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.impl:
        _worker(args)
        return 0

    import torch

    from solq_d2.layers import _ext

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("pytorch", "auto"):
            save = os.path.join(tmp, f"{impl}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--save", save]
            cmd += ["--height", str(args.height), "--width", str(args.width)]
            cmd += ["--runs", str(args.runs), "--device", args.device]
            cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                return 1
            results[impl] = json.loads(lines[-1][len("RESULT ") :])
            results[impl]["outputs"] = torch.load(save, weights_only=True)
    a, b = results["pytorch"], results["auto"]
    print(f"SOLQ R50 d384 Q300, one {args.height}x{args.width} image, device {args.device}")
    print(f"MSDA implementation used by 'auto': {_ext.op_report().get('ms_deform_attn')}")
    for r in (a, b):
        mem = f"peak RSS {r['peak_rss_mb']:.0f} MB (after build {r['rss_after_build_mb']:.0f} MB)"
        if "cuda_peak_allocated_mb" in r:
            mem += f", CUDA peak allocated {r['cuda_peak_allocated_mb']:.0f} MB"
        print(
            f"  {r['impl']:>8}: {r['latency_s']:.3f} s median of {len(r['latencies_s'])} "
            f"{['%.3f' % x for x in r['latencies_s']]} (process CPU time {r['cpu_s']:.1f} s), "
            f"{r['threads']} threads, {mem}"
        )
    print(
        f"  speed-up compiled / pytorch: {a['latency_s'] / b['latency_s']:.2f}x wall, "
        f"{a['cpu_s'] / b['cpu_s']:.2f}x CPU time"
    )
    oa, ob = a["outputs"], b["outputs"]
    for key in ("memory", "hs", "pred_boxes", "scores"):
        print(f"  max |diff| {key}: {(oa[key] - ob[key]).abs().max().item():.2e}")
    same_labels = torch.equal(oa["labels"], ob["labels"])
    diff_px = (
        (oa["masks"] != ob["masks"]).float().mean().item()
        if oa["masks"].shape == ob["masks"].shape
        else 1.0
    )
    print(f"  labels identical: {same_labels}; mask pixels differing: {diff_px:.2e}")
    print(f"  load average: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
