"""SOLQ parity with the official code (megvii-research/SOLQ@97f537c) on the fixtures
``solq_r50_parity.pt`` (one 320x480 image) and ``solq_r50_parity_batch2.pt`` (padded batch of
320x480 + 352x416), tolerances from the fixtures' README.

The fixture weights are written as an official-format file (``{"model", "args"}``) and loaded the
way a user loads the released checkpoint. Each image batch runs once through ``model(inputs)``;
hooks record the transformer output and the input projections on the way.
"""

import argparse

import numpy as np
import pytest
import torch

from solq_d2.modeling.solq.postprocess import solq_postprocess

from ..conftest import load_fixture
from .test_solq_common import build_solq_r50_parity_model, load_official_file, unpack_masks


@pytest.fixture(scope="module")
def fx():
    return load_fixture("solq_r50_parity.pt")


@pytest.fixture(scope="module")
def fx2():
    return load_fixture("solq_r50_parity_batch2.pt")


@pytest.fixture(scope="module")
def model(fx, tmp_path_factory):
    model = build_solq_r50_parity_model(num_queries=50)
    path = tmp_path_factory.mktemp("official") / "solq_r50_fixture.pth"
    args = argparse.Namespace(**fx["config"]["args"])
    torch.save({"model": fx["state_dict"], "args": args, "epoch": 49}, path)
    load_official_file(model, str(path))
    return model.eval()


def _run(model, images_hwc):
    """model(inputs) once; returns the instances and the recorded intermediates."""
    rec = {}
    hooks = [
        model.transformer.register_forward_hook(lambda m, i, o: rec.__setitem__("t", o)),
        model.input_proj.register_forward_hook(lambda m, i, o: rec.__setitem__("srcs", o[0])),
    ]
    inputs = [{"image": im.permute(2, 0, 1).contiguous()} for im in images_hwc]
    try:
        with torch.no_grad():
            rec["results"] = [r["instances"] for r in model(inputs)]
            t = rec["t"]
            rec["pred_logits"] = torch.stack(
                [model._head(model.class_embed, k)(h) for k, h in enumerate(t.hs)]
            )
            rec["pred_vectors"] = model.vector_embed(t.hs)
            rec["pred_boxes"] = t.pred_boxes
    finally:
        for h in hooks:
            h.remove()
    return rec


@pytest.fixture(scope="module")
def main_run(model, fx):
    return _run(model, [fx["input"]["image_rgb_uint8_hwc"]])


@pytest.fixture(scope="module")
def batch2_run(model, fx2):
    return _run(model, fx2["input"]["images_rgb_uint8_hwc"])


def _close(a, b, atol):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


def test_raw_outputs_all_layers(main_run, fx):
    for key, atol in (("pred_logits", 1e-4), ("pred_boxes", 1e-5), ("pred_vectors", 1e-3)):
        _close(main_run[key], fx["per_layer"][key], atol)
        _close(main_run[key][-1], fx["outputs"][key], atol)
        for k, aux in enumerate(fx["aux_outputs"]):
            _close(main_run[key][k], aux[key], atol)


def test_intermediates(main_run, fx):
    ref, t = fx["intermediates"], main_run["t"]
    for ours, theirs in zip(main_run["srcs"], ref["srcs"]):
        _close(ours, theirs, 1e-4)
    _close(t.memory, ref["memory"], 1e-4)
    _close(t.hs, ref["hs"], 1e-4)
    _close(t.init_reference, ref["init_reference"], 1e-5)
    _close(t.inter_references, ref["inter_references"], 1e-5)


def _check_postprocessed(inst, pp, vectors, model):
    _close(inst.scores, pp["scores"], 1e-5)
    assert torch.equal(inst.pred_classes, pp["labels"])
    _close(inst.pred_boxes.tensor, pp["boxes"], 1e-2)
    # masks_128: decode the vectors of the kept queries (the fixture stores query_index)
    m128 = unpack_masks(pp["masks_128_packed"])
    ours128 = model.mask_coder.decode(vectors[pp["query_index"]]).numpy().astype(np.uint8)
    assert (ours128 == m128).mean() >= 0.9999
    masks = unpack_masks(pp["masks_packed"]).astype(bool)
    ours = inst.pred_masks.numpy()
    assert ours.shape == masks.shape
    assert (ours != masks).mean() <= 1e-4
    inter = (ours & masks).sum((1, 2))
    union = (ours | masks).sum((1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    assert iou.min() >= 0.99


def test_postprocessed(main_run, fx, model):
    pp = fx["postprocessed"]
    (inst,) = main_run["results"]
    assert inst.image_size == (320, 480) and len(inst) == 100
    _check_postprocessed(inst, pp, main_run["pred_vectors"][-1, 0], model)


def test_postprocess_function_query_index(main_run, fx, model):
    """The functional post-processing also reports the query of each detection."""
    r = solq_postprocess(
        main_run["pred_logits"][-1],
        main_run["pred_boxes"][-1],
        main_run["pred_vectors"][-1],
        [(320, 480)],
        model.mask_coder,
    )[0]
    assert torch.equal(r["query_index"], fx["postprocessed"]["query_index"])
    assert torch.equal(r["query_index"] * 91 + r["labels"], fx["postprocessed"]["topk_flat_index"])


def test_batch2_padding(batch2_run, fx2, model):
    assert [tuple(s.shape[-2:]) for s in batch2_run["srcs"]] == [
        (44, 60),
        (22, 30),
        (11, 15),
        (6, 8),
    ]
    for key, atol in (("pred_logits", 1e-4), ("pred_boxes", 1e-5), ("pred_vectors", 1e-3)):
        _close(batch2_run[key][-1], fx2["outputs"][key], atol)
        for k, aux in enumerate(fx2["aux_outputs"]):
            _close(batch2_run[key][k], aux[key], atol)
    ref, t = fx2["intermediates"], batch2_run["t"]
    _close(t.memory, ref["memory"], 1e-4)
    _close(t.hs, ref["hs"], 1e-4)
    _close(t.init_reference, ref["init_reference"], 1e-5)
    _close(t.inter_references, ref["inter_references"], 1e-5)
    # image 0 (320x480) is padded at the bottom, image 1 (352x416) on the right
    _close(t.valid_ratios[:, 0], torch.tensor([[1.0, 40 / 44], [52 / 60, 1.0]]), 1e-7)
    for b, (inst, pp) in enumerate(zip(batch2_run["results"], fx2["postprocessed"])):
        assert inst.image_size == tuple(fx2["input"]["target_sizes"][b].tolist())
        _check_postprocessed(inst, pp, batch2_run["pred_vectors"][-1, b], model)
