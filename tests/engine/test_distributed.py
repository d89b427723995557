"""2 CPU processes (gloo) train exactly like 1 process seeing the same total batch.

The loss of DETR-family models is divided by the number of ground-truth boxes *all-reduced over
the processes*; with DDP's gradient averaging this makes a step on D processes with B/D images
each identical to a step on one process with B images. The batch here is deliberately uneven
(1 + 0 boxes on one process, 3 + 1 on the other) so that a per-process normalisation would show.
The model is ``dist_check.ARCH``: "solq" (a tiny SOLQ, whose criterion all-reduces the box count)
or "toy" (the engine tests' model, which normalises its losses the same way).
"""

import subprocess
import sys

import pytest
import torch

import engine_toy


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, str(engine_toy.ENGINE_TESTS_DIR / "dist_check.py"), str(work)],
        cwd=str(engine_toy.REPO_ROOT),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-8000:]
    load = lambda name: torch.load(work / name, weights_only=True)  # noqa: E731
    return work, load


def _close(a, b, scale):
    """Equal up to float32 summation-order noise: 1e-4 of the reference tensor's largest entry."""
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale + 1e-12)


def test_uneven_batch_and_normalisation_matters(dist_run):
    _, load = dist_run
    ref = load("ref.pt")
    assert ref["num_boxes"] == [1, 0, 3, 1]
    assert [load(f"rank{r}.pt")["num_boxes"] for r in (0, 1)] == [[1, 0], [3, 1]]
    # without the all-reduced box count, the gradients would differ clearly
    rel = [
        ((ref["naive_grads"][n] - g).abs().max() / g.abs().max()).item()
        for n, g in ref["raw_grads"].items()
        if g.abs().max() > 0
    ]
    assert max(rel) > 1e-2  # 100 times the tolerance of the comparisons below


def test_losses_gradients_and_step_match_one_process(dist_run):
    _, load = dist_run
    ref, rank0, rank1 = load("ref.pt"), load("rank0.pt"), load("rank1.pt")
    assert set(rank0["losses"]) == set(ref["losses"]) >= {"total_loss", "loss_ce", "loss_bbox"}
    for k, value in ref["losses"].items():
        assert rank0["losses"][k] == pytest.approx(value, rel=1e-5), k
    # zero-initialised output layers (Deformable DETR's init) leave a few gradients at 0 at step 1
    nonzero = [n for n, g in ref["grads"].items() if g.abs().sum() > 0]
    assert len(nonzero) >= 0.75 * len(ref["grads"])
    for n, g in ref["grads"].items():
        scale = g.abs().max().item()
        _close(rank0["grads"][n], g, scale)  # averaged, then clipped (full model) gradients
        _close(rank1["grads"][n], g, scale)
        _close(rank0["params"][n], ref["params"][n], ref["lr"] * scale)  # the SGD step
        _close(rank1["params"][n], ref["params"][n], ref["lr"] * scale)
        if scale > 0:
            assert not torch.equal(ref["params"][n], ref["init_params"][n]), n


def test_trainer_runs_on_two_processes(dist_run):
    work, load = dist_run
    final0, final1 = load("final_rank0.pt"), load("final_rank1.pt")
    for n, p in final0["params"].items():
        torch.testing.assert_close(final1["params"][n], p, rtol=0, atol=0)
    assert final1["eval"] is None and set(final0["eval"]) == {"bbox", "segm"}
    saved = torch.load(work / "out" / "model_final.pth", weights_only=True)
    assert saved["iteration"] == 2
    for n, p in final0["params"].items():
        torch.testing.assert_close(saved["model"][n], p, rtol=0, atol=0)
