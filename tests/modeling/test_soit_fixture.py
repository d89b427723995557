"""Reading the SOIT parity fixture (``soit_r50_parity.pt``, made with the authors' opera code):
its packed weights, GT and the helpers the other SOIT tests share; and checks of those helpers."""

from typing import Dict, List

import numpy as np
import pytest
import torch

from ..conftest import load_fixture

FIXTURE = "soit_r50_parity.pt"
NUM_OFFICIAL_KEYS = 679  # fixture README: 679 state-dict keys, 30 of them aliases


def unpack_2bit(entry: Dict) -> torch.Tensor:
    """A ``weights_packed2bit`` entry -> float32 tensor: value (2c - 3) * scale for the 2-bit
    code c; element 4k+j of the row-major tensor sits in bits [2j+1:2j] of byte k."""
    shape = tuple(entry["shape"])
    byte = torch.arange(256)
    table = torch.stack([(byte >> (2 * j)) & 3 for j in range(4)], -1).float() * 2 - 3
    values = (table * float(entry["scale"]))[entry["data"].int()].flatten()
    return values[: int(np.prod(shape))].view(shape)


def official_state_dict(fx: Dict) -> Dict[str, torch.Tensor]:
    """The opera state dict of the fixture (official key order, aliases as separate tensors)."""
    sd = {}
    for key in fx["state_dict_keys"]:
        src = fx["state_dict_aliases"].get(key, key)
        if src in fx["weights_fp16"]:
            sd[key] = fx["weights_fp16"][src].float()
        elif src in fx["weights_packed2bit"]:
            sd[key] = unpack_2bit(fx["weights_packed2bit"][src])
        else:
            sd[key] = fx["weights_int"][src].clone()
    return sd


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """``np.packbits`` of a flattened bool array -> bool tensor of ``shape``."""
    n = int(np.prod(shape))
    return torch.from_numpy(np.unpackbits(packed.numpy())[:n].reshape(tuple(shape)).astype(bool))


def gt_masks(fx: Dict, b: int) -> torch.Tensor:
    """(N, h, w) bool GT masks of image ``b`` (at its unpadded input size)."""
    inp = fx["inputs"]
    return unpack_bits(inp["gt_masks_packbits"][b], inp["gt_masks_shape"][b])


def batched_inputs(fx: Dict, with_instances: bool = False) -> List[Dict]:
    """Detectron2 inputs of the fixture batch: uint8 RGB images, requested output size (opera
    ``ori_shape``) and, optionally, the GT instances."""
    from detectron2.structures import BitMasks, Boxes, Instances

    inp = fx["inputs"]
    out = []
    for b, img in enumerate(inp["imgs_rgb_uint8"]):
        meta = inp["img_metas"][b]
        d = {"image": img.clone(), "height": meta["ori_shape"][0], "width": meta["ori_shape"][1]}
        if with_instances:
            inst = Instances(tuple(img.shape[-2:]))
            inst.gt_boxes = Boxes(inp["gt_bboxes"][b].clone())
            inst.gt_classes = inp["gt_labels"][b].clone()
            inst.gt_masks = BitMasks(gt_masks(fx, b))
            d["instances"] = inst
        out.append(d)
    return out


def query_alignment(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Indices ``p`` with ``ours[p] == theirs`` (two orderings of the same encoder tokens).

    The two-stage top-k has near-ties inside the selected set (fixture README), so queries are
    aligned by the encoder token they come from; the decoder is permutation-equivariant.
    """
    pos = {int(t): i for i, t in enumerate(ours.tolist())}
    missing = [int(t) for t in theirs.tolist() if int(t) not in pos]
    assert not missing, f"encoder tokens selected by the official code but not by ours: {missing}"
    return torch.as_tensor([pos[int(t)] for t in theirs.tolist()])


@pytest.fixture(scope="module")
def soit_fx():
    return load_fixture(FIXTURE)


def test_official_state_dict_unpacks_to_declared_shapes(soit_fx):
    sd = official_state_dict(soit_fx)
    assert len(sd) == NUM_OFFICIAL_KEYS
    for key, entry in soit_fx["weights_packed2bit"].items():
        assert tuple(sd[key].shape) == tuple(entry["shape"]), key
        # 2-bit codes: four values {-3s, -s, s, 3s} (checked on the first values)
        assert set(sd[key].flatten()[:4096].unique().tolist()) <= {
            -3 * entry["scale"],
            -entry["scale"],
            entry["scale"],
            3 * entry["scale"],
        }
    assert sd["bbox_head.seg_branches.0.4.weight"].shape == (441, 256)
    for alias, canonical in soit_fx["state_dict_aliases"].items():
        assert torch.equal(sd[alias], sd[canonical])


def test_gt_masks_and_inputs_are_consistent(soit_fx):
    inp = soit_fx["inputs"]
    for b in range(2):
        m = gt_masks(soit_fx, b)
        h, w = inp["img_metas"][b]["img_shape"][:2]
        assert m.shape == (len(inp["gt_labels"][b]), h, w)
        # the masks are ellipses inscribed in the GT boxes: non-empty and inside them
        for mask, (x0, y0, x1, y1) in zip(m, inp["gt_bboxes"][b].tolist()):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert len(ys) > 0
            assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
    # the normalised, padded network input is the normalisation of the uint8 images
    mean = inp["pixel_mean_rgb"].view(3, 1, 1)
    std = inp["pixel_std_rgb"].view(3, 1, 1)
    for b, img in enumerate(inp["imgs_rgb_uint8"]):
        h, w = img.shape[-2:]
        torch.testing.assert_close(inp["img"][b, :, :h, :w], (img.float() - mean) / std)
        assert inp["img"][b, :, h:].abs().sum() == 0 and inp["img"][b, :, :, w:].abs().sum() == 0


def test_query_alignment():
    ours = torch.tensor([7, 3, 9, 1])
    theirs = torch.tensor([1, 9, 7, 3])
    p = query_alignment(ours, theirs)
    assert torch.equal(ours[p], theirs)
    with pytest.raises(AssertionError, match="not by ours"):
        query_alignment(ours, torch.tensor([1, 2]))
