#!/usr/bin/env python
"""Compile and link the CUDA half of csrc/ into a scratch directory (no GPU needed).

CI runs this where ``nvcc`` exists so that CUDA code which stops compiling fails the build.
Architectures: ``TORCH_CUDA_ARCH_LIST`` (default "8.0;9.0"). The built module is then loaded in
a fresh process to check that it links against torch and registers every ``solq_d2`` op with a
CUDA kernel compiled in. ``CUDA_HOME`` defaults to the toolkit that holds ``nvcc``.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for cand in ("/usr/local/cuda",):
        if Path(cand, "bin", "nvcc").exists():
            return cand
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("nvcc not found; set CUDA_HOME")
    return str(Path(nvcc).resolve().parents[1])


CHECK = r"""
import importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("solq_d2._C", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
assert mod.has_cuda(), "the CUDA build does not report CUDA kernels"
print("CUDA build:", mod.get_cuda_version(), "archs", mod.get_cuda_archs())
ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("solq_d2::"))
print("registered ops:", ", ".join(ops) or "(none)")
for name in ops:
    if name.endswith(("_forward", "_backward")):
        for key in ("CPU", "CUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, key), (
                f"{name} has no {key} kernel")
"""


def main():
    env = dict(
        os.environ,
        FORCE_CUDA="1",
        CUDA_HOME=cuda_home(),
        TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0"),
        MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 2)),
    )
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="solq_d2_cuda_") as tmp:
        cmd = [sys.executable, "setup.py", "-q", "build_ext",
               "--build-lib", f"{tmp}/lib", "--build-temp", f"{tmp}/tmp"]
        print("[cuda-build-check]", " ".join(cmd), "with TORCH_CUDA_ARCH_LIST=" + env["TORCH_CUDA_ARCH_LIST"],
              flush=True)
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        (so,) = Path(tmp, "lib", "solq_d2").glob("_C*.so")
        subprocess.run([sys.executable, "-c", CHECK, str(so)], check=True)
    print(f"[cuda-build-check] CUDA sources compiled and linked in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
