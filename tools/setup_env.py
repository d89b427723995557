#!/usr/bin/env python3
"""`make setup`: create or update ``.venv/`` with everything solq_d2 needs. Idempotent.

Steps (each skipped when already done):

1. PyTorch. If the interpreter that runs this script (``make setup PYTHON=...``) already imports
   torch and torchvision, ``.venv`` is created with ``--system-site-packages`` and uses them
   (your own CUDA build is kept). Otherwise torch/torchvision (``SOLQ_D2_TORCH_SPEC``, default
   ``torch==2.14.1 torchvision==0.29.1``) are installed **once per machine** into a shared
   environment under ``$SOLQ_D2_CACHE`` (default ``~/.cache/solq_d2``), which ``.venv`` sees
   through a ``.pth`` file: a 5.5 GB torch is not copied into every clone.
2. ``requirements-dev.txt`` into ``.venv``.
3. Detectron2 through ``tools/detectron2/install_detectron2.py`` (its policy is documented there
   and in INSTALL.md).
4. solq_d2 in development mode (``pip install -e .``), then ``setup.py build_ext --inplace``,
   which rebuilds ``solq_d2._C`` incrementally when ``csrc/`` changed.
5. A check that detectron2 and ``solq_d2._C`` import; set-up fails loudly otherwise.

Only the standard library is used, so this runs before anything is installed.
"""
import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TORCH_SPEC = "torch==2.14.1 torchvision==0.29.1"


def log(msg):
    print(f"[setup] {msg}", flush=True)


def run(cmd, **kw):
    log(" ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ok(cmd):
    return subprocess.run([str(c) for c in cmd], capture_output=True).returncode == 0


@contextlib.contextmanager
def file_lock(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cache_root():
    root = os.environ.get("SOLQ_D2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "solq_d2"
    )
    return Path(root)


def venv_python(venv):
    return venv / "bin" / "python"


def purelib(python):
    out = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    )
    return Path(out.stdout.strip())


def shared_torch_env(base_python, spec):
    """A per-machine environment holding torch/torchvision, created once (under a lock)."""
    tag = hashlib.sha256(spec.encode()).hexdigest()[:10]
    ver = f"cp{sys.version_info.major}{sys.version_info.minor}"
    env = cache_root() / "envs" / f"torch-{ver}-{tag}"
    done = env / ".solq_d2_complete"
    with file_lock(cache_root() / "envs" / f".{env.name}.lock"):
        if done.exists() and ok([venv_python(env), "-c", "import torch, torchvision"]):
            return env
        if env.exists():
            log(f"{env} is incomplete; recreating it")
            shutil.rmtree(env)
        log(f"installing {spec} once for this machine into {env}")
        run([base_python, "-m", "venv", env])
        run([venv_python(env), "-m", "pip", "install", *spec.split()])
        done.write_text(spec + "\n")
    return env


def make_venv(venv, base_python, spec):
    py = venv_python(venv)
    if venv.exists() and ok([py, "-c", "import torch, torchvision"]):
        return
    if venv.exists():
        log(f"{venv} exists but cannot import torch; recreating it")
        shutil.rmtree(venv)
    if ok([base_python, "-c", "import torch, torchvision"]):
        log(f"{base_python} already has torch: .venv will use it (--system-site-packages)")
        run([base_python, "-m", "venv", "--system-site-packages", venv])
        return
    env = shared_torch_env(base_python, spec)
    run([base_python, "-m", "venv", venv])
    pth = purelib(py) / "_solq_d2_shared_torch.pth"
    pth.write_text(str(purelib(venv_python(env))) + "\n")
    log(f"{pth.name}: .venv sees torch from {env}")
    if not ok([py, "-c", "import torch, torchvision"]):
        raise SystemExit("torch is not importable from .venv after set-up")


def stamp_ok(venv, name, content):
    f = venv / f".solq_d2_{name}.sha256"
    digest = hashlib.sha256(content).hexdigest()
    return f, digest, f.exists() and f.read_text().strip() == digest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--venv", default=str(ROOT / ".venv"))
    ap.add_argument("--python", default=os.environ.get("PYTHON") or sys.executable,
                    help="interpreter the venv is made from")
    args = ap.parse_args()
    venv = Path(args.venv).resolve()
    spec = os.environ.get("SOLQ_D2_TORCH_SPEC", DEFAULT_TORCH_SPEC)
    t0 = time.time()
    with file_lock(ROOT / ".setup.lock"):
        make_venv(venv, args.python, spec)
        py = venv_python(venv)

        reqs = (ROOT / "requirements.txt").read_bytes() + (ROOT / "requirements-dev.txt").read_bytes()
        stamp, digest, fresh = stamp_ok(venv, "requirements", reqs)
        if not fresh:
            run([py, "-m", "pip", "install", "-r", ROOT / "requirements-dev.txt"])
            stamp.write_text(digest + "\n")

        run([py, ROOT / "tools" / "detectron2" / "install_detectron2.py"])

        if not ok([py, "-m", "pip", "show", "-q", "solq_d2"]):
            run([py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", ROOT])
        # Incremental (ninja) rebuild of solq_d2._C when csrc/ changed.
        run([py, "setup.py", "-q", "build_ext", "--inplace"], cwd=ROOT)

        check = (
            "import detectron2, solq_d2, solq_d2._C;"
            "from solq_d2.layers import _ext;"
            "assert _ext.available(), _ext.reason();"
            "print('detectron2', detectron2.__version__, '| solq_d2', solq_d2.__version__,"
            " '| solq_d2._C', _ext.build_info())"
        )
        run([py, "-c", check], cwd=ROOT)
    log(f"done in {time.time() - t0:.0f}s; activate with: source .venv/bin/activate")


if __name__ == "__main__":
    main()
