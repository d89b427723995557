#!/usr/bin/env python
"""Install Detectron2 into the running Python environment, following solq_d2's policy.

Detectron2 is not published on PyPI. In order, this script:

1. does nothing if ``import detectron2`` already works (a user's own build is kept);
2. installs it from its official source repository
   (``pip install --no-build-isolation git+https://github.com/facebookresearch/detectron2.git``),
   which is what users with internet access get (compiled ops included);
3. otherwise falls back to the PyPI copy of detectron2 v0.6's Python sources
   (``pb1-detectron2==0.6``, byte-identical to the v0.6 release's ``detectron2/`` package but
   without ``detectron2/layers/csrc``), patched by ``v0.6-pypi-compat.patch`` next to this file.
   The patch is the smallest set of changes that makes those sources run on today's stack
   (Pillow >= 10, numpy >= 1.24, setuptools >= 81, no compiled extension); each hunk is
   explained in INSTALL.md. The built wheel is cached so later set-ups reuse it.

Choose a step with ``--mode {auto,source,pypi-fallback}`` or ``SOLQ_D2_DETECTRON2_MODE``.
Run it with the interpreter of the target environment (``make setup`` does this).
Only the standard library is used here.
"""
import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PATCH = HERE / "v0.6-pypi-compat.patch"
SOURCE_URL = "git+https://github.com/facebookresearch/detectron2.git"
FALLBACK_DIST = "pb1-detectron2==0.6"
FALLBACK_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
FALLBACK_VERSION_SUFFIX = "+pypisrc.compat1"
# Runtime dependencies of detectron2 v0.6 (its install_requires, without the black==21.4b2 pin
# that only its LazyConfig pretty-printer imports lazily).
FALLBACK_REQUIREMENTS = [
    "Pillow>=7.1",
    "matplotlib",
    "pycocotools>=2.0.2",
    "termcolor>=1.1",
    "yacs>=0.1.8",
    "tabulate",
    "cloudpickle",
    "tqdm>4.29.0",
    "tensorboard",
    "fvcore>=0.1.5,<0.1.6",
    "iopath>=0.1.7,<0.1.10",
    "future",
    "pydot",
    "omegaconf>=2.1",
    "hydra-core>=1.1",
]


def log(msg):
    print(f"[install_detectron2] {msg}", flush=True)


def pip(*args, check=True, timeout=None):
    cmd = [sys.executable, "-m", "pip", *args]
    log(" ".join(cmd))
    return subprocess.run(cmd, check=check, timeout=timeout)


def importable():
    r = subprocess.run(
        [sys.executable, "-c", "import detectron2, detectron2.config, detectron2.modeling"],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0, r.stderr.strip().splitlines()[-1:] if r.stderr else []


def cache_dir():
    root = os.environ.get("SOLQ_D2_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "solq_d2"
    )
    return Path(root)


def source_reachable(timeout=60):
    """Cheap check before a long pip run: can git reach the repository at all?"""
    url = SOURCE_URL[len("git+"):]
    try:
        r = subprocess.run(["git", "ls-remote", "--exit-code", url, "HEAD"],
                           capture_output=True, timeout=timeout,
                           env=dict(os.environ, GIT_TERMINAL_PROMPT="0"))
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def try_source(timeout):
    if not source_reachable():
        log(f"{SOURCE_URL} is not reachable (git ls-remote failed)")
        return False
    try:
        r = pip("install", "--no-build-isolation", SOURCE_URL, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        log(f"installing from {SOURCE_URL} took more than {timeout}s; giving up on it")
        return False
    return r.returncode == 0


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_fallback_wheel(wheel_dir):
    """Download the v0.6 sdist, check its hash, apply the patch, build a wheel into wheel_dir."""
    patch_id = sha256(PATCH)[:12]
    wheel_dir = wheel_dir / f"detectron2-0.6-{patch_id}"
    wheels = sorted(wheel_dir.glob("detectron2-*.whl"))
    if wheels:
        log(f"reusing cached wheel {wheels[-1]}")
        return wheels[-1]
    with tempfile.TemporaryDirectory(prefix="solq_d2_d2_") as tmp:
        tmp = Path(tmp)
        # --no-build-isolation: the sdist's setup.py imports torch even for metadata.
        pip("download", "--no-deps", "--no-build-isolation", "--dest", str(tmp), FALLBACK_DIST)
        sdists = list(tmp.glob("pb1*detectron2-0.6.tar.gz"))
        if len(sdists) != 1:
            raise SystemExit(f"expected one sdist of {FALLBACK_DIST} in {tmp}, got {sdists}")
        digest = sha256(sdists[0])
        if digest != FALLBACK_SHA256:
            raise SystemExit(
                f"{sdists[0].name}: sha256 {digest} does not match the expected "
                f"{FALLBACK_SHA256}; refusing to build it"
            )
        with tarfile.open(sdists[0]) as tar:
            tar.extractall(tmp / "src", filter="data")
        (src,) = [p for p in (tmp / "src").iterdir() if p.is_dir()]
        log(f"applying {PATCH.name}")
        subprocess.run(["patch", "-p1", "--forward", "-i", str(PATCH)], cwd=src, check=True)
        wheel_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, D2_VERSION_SUFFIX=FALLBACK_VERSION_SUFFIX)
        staging = tmp / "wheel"
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
               "-w", str(staging), str(src)]
        log(" ".join(cmd))
        subprocess.run(cmd, check=True, env=env)
        (built,) = staging.glob("detectron2-*.whl")
        final = wheel_dir / built.name
        shutil.move(str(built), str(final) + ".part")
        os.replace(str(final) + ".part", final)  # atomic: concurrent set-ups see all or nothing
        return final


def install_fallback():
    pip("install", *FALLBACK_REQUIREMENTS)
    wheel = build_fallback_wheel(cache_dir() / "wheels")
    pip("install", "--no-deps", "--force-reinstall", str(wheel))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--mode",
        default=os.environ.get("SOLQ_D2_DETECTRON2_MODE", "auto"),
        choices=["auto", "source", "pypi-fallback"],
        help="auto: keep an importable detectron2, else source, else the PyPI fallback",
    )
    ap.add_argument("--source-timeout", type=int, default=1800,
                    help="seconds allowed for the source install (it compiles detectron2's ops)")
    args = ap.parse_args()

    ok, err = importable()
    if ok and args.mode == "auto":
        log("detectron2 is already importable; keeping it")
        return
    if not ok and err:
        log(f"detectron2 is not importable: {err[0]}")
    if args.mode in ("auto", "source"):
        if try_source(args.source_timeout) and importable()[0]:
            log(f"installed detectron2 from {SOURCE_URL}")
            return
        if args.mode == "source":
            raise SystemExit(f"could not install detectron2 from {SOURCE_URL}")
        log(f"{SOURCE_URL} is not reachable from here; using the PyPI v0.6 Python sources")
    install_fallback()
    ok, err = importable()
    if not ok:
        raise SystemExit(f"detectron2 still does not import after the fallback install: {err}")
    log("installed detectron2 v0.6 (PyPI Python sources + compat patch, no compiled ops)")


if __name__ == "__main__":
    main()
