"""train_net.py end to end (subprocesses): resume after SIGKILL, --eval-only, config errors."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import engine_toy
from solq_d2.checkpoint import SolqD2Checkpointer, safe_torch_load
from solq_d2.engine import Trainer

SCRIPT = str(engine_toy.ENGINE_TESTS_DIR / "toy_train_net.py")


def _env(datasets):
    env = dict(os.environ)
    env["TOY_DATASETS"] = ",".join(f"{k}={v}" for k, v in datasets.items())
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _write_cfg(tmp_path, cfg):
    path = tmp_path / "config.yaml"
    path.write_text(cfg.dump())
    return str(path)


def _run(args, env, timeout=240):
    proc = subprocess.run(
        [sys.executable, SCRIPT, *args],
        env=env,
        cwd=str(engine_toy.REPO_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    return proc.stdout


def _wait_for(predicate, proc, timeout, log_path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(
                f"training exited early ({proc.returncode}):\n{log_path.read_text()[-6000:]}"
            )
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no checkpoint after {timeout}s:\n{log_path.read_text()[-6000:]}")


def test_resume_after_sigkill(tmp_path):
    datasets = {"engine_resume_train": str(tmp_path / "ds")}
    out = tmp_path / "out"
    cfg = engine_toy.make_cfg("engine_resume_train", output_dir=str(out))
    cfg.SOLVER.MAX_ITER = 100000  # runs until killed
    cfg.SOLVER.CHECKPOINT_PERIOD = 3
    config = _write_cfg(tmp_path, cfg)
    env = _env(datasets)

    log_path = tmp_path / "first_run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "--config-file", config],
            env=env,
            cwd=str(engine_toy.REPO_ROOT),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_for(lambda: (out / "last_checkpoint").exists(), proc, 180, log_path)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # every *.pth the killed run left is complete; "last_checkpoint" names one of them
    last = (out / "last_checkpoint").read_text().strip()
    saved = sorted(p.name for p in out.iterdir() if p.name.endswith(".pth"))
    assert last in saved
    for name in saved:
        assert zipfile.is_zipfile(out / name), name
        safe_torch_load(str(out / name))
    k = safe_torch_load(str(out / last))["iteration"]
    assert last == f"model_{k:07d}.pth"
    # what a kill during a later save would leave behind: never picked up
    partial = out / f"model_9999999.pth.tmp-{proc.pid}"
    partial.write_bytes((out / last).read_bytes()[:1000])

    max_iter = k + 4
    text = _run(["--config-file", config, "--resume", "SOLVER.MAX_ITER", str(max_iter)], env)
    assert f"Loading from {out / last}" in text
    assert f"Starting training from iteration {k + 1}" in text
    final = safe_torch_load(str(out / "model_final.pth"))
    assert final["iteration"] == max_iter - 1
    # AdamW's state was restored: it counts every step of both runs, not only the 3 new ones
    steps = {int(s["step"]) for s in final["trainer"]["_trainer"]["optimizer"]["state"].values()}
    assert steps == {max_iter}
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    iters = [json.loads(line)["iteration"] for line in open(out / "metrics.json")]
    assert iters[-1] == max_iter - 1


def test_eval_only_smoke(tmp_path):
    datasets = {"engine_eval_val": str(tmp_path / "ds")}
    engine_toy.register_tiny_coco("engine_eval_val", datasets["engine_eval_val"])
    cfg = engine_toy.make_cfg("engine_eval_val", "engine_eval_val", str(tmp_path / "out"))
    weights = tmp_path / "weights"
    SolqD2Checkpointer(Trainer.build_model(cfg), str(weights)).save("toy")
    config = _write_cfg(tmp_path, cfg)
    text = _run(
        ["--config-file", config, "--eval-only", "MODEL.WEIGHTS", str(weights / "toy.pth")],
        _env(datasets),
    )
    assert f"Loading from {weights / 'toy.pth'}" in text
    assert "Evaluation results for bbox" in text and "Evaluation results for segm" in text
    assert "copypaste: Task: segm" in text
    results = tmp_path / "out" / "inference" / "engine_eval_val" / "coco_instances_results.json"
    detections = json.loads(results.read_text())
    assert detections and {"bbox", "segmentation", "score"} <= set(detections[0])


def test_unsafe_weights_fail_clearly(tmp_path):
    class _Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    datasets = {"engine_unsafe_val": str(tmp_path / "ds")}
    cfg = engine_toy.make_cfg("engine_unsafe_val", "engine_unsafe_val", str(tmp_path / "out"))
    weights = tmp_path / "evil.pth"
    torch.save({"model": {}, "x": _Payload()}, weights)
    proc = subprocess.run(
        [
            sys.executable,
            SCRIPT,
            "--config-file",
            _write_cfg(tmp_path, cfg),
            "--eval-only",
            "MODEL.WEIGHTS",
            str(weights),
        ],
        env=_env(datasets),
        cwd=str(engine_toy.REPO_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=240,
    )
    assert proc.returncode != 0
    assert "UnsafeCheckpointError: Refusing to load checkpoint" in proc.stdout
    assert not (tmp_path / "pwned").exists()
