"""SOLQ DCT mask coder: official encoding/decoding on the fixture, math by hand, edge cases."""

import math

import numpy as np
import pytest
import torch

from solq_d2.modeling.solq.dct import DCTMaskCoder, dct_matrix, zigzag_indices

from ..conftest import load_fixture
from .test_solq_common import unpack_masks


@pytest.fixture(scope="module")
def fx():
    return load_fixture("solq_r50_parity.pt")


def test_zigzag_golden_prefix_and_official_table(fx):
    rc = [(int(i) // 128, int(i) % 128) for i in zigzag_indices(128, 256)[:11]]
    assert rc == [
        (0, 0),
        (0, 1),
        (1, 0),
        (2, 0),
        (1, 1),
        (0, 2),
        (0, 3),
        (1, 2),
        (2, 1),
        (3, 0),
        (4, 0),
    ]
    zz = zigzag_indices(128, 256)
    assert torch.equal(zz, fx["dct_encoding"]["zigzag_flat_index"])
    # 256 = diagonals 0..21 (253 entries) + (22,0), (21,1), (20,2)
    assert [(int(i) // 128, int(i) % 128) for i in zz[-3:]] == [(22, 0), (21, 1), (20, 2)]
    small = zigzag_indices(3, 9).tolist()
    assert small == [0, 1, 3, 6, 4, 2, 5, 7, 8]  # the full 3x3 JPEG order
    with pytest.raises(ValueError):
        zigzag_indices(4, 17)


def test_dct_matrix_is_orthonormal_dct2():
    A = dct_matrix(8)
    torch.testing.assert_close(A @ A.t(), torch.eye(8, dtype=torch.float64))
    x = torch.rand(8, dtype=torch.float64)
    k = 3
    by_hand = math.sqrt(2 / 8) * sum(x[n] * math.cos(math.pi * (n + 0.5) * k / 8) for n in range(8))
    torch.testing.assert_close((A @ x)[k], by_hand)


def test_encoding_matches_official(fx):
    """GT masks cropped by the GT boxes (aligned ROIAlign) then DCT: crops exact, vectors 1e-4."""
    t, ref = fx["criterion"]["targets"][0], fx["dct_encoding"]
    coder = DCTMaskCoder(128, 256)
    crops = coder.crop_masks(t["masks"], t["xyxy_boxes"])
    assert torch.equal(crops.to(torch.uint8), ref["gt_masks_128"])
    vec = coder.encode(t["masks"], t["xyxy_boxes"])
    assert vec.dtype == torch.float32 and vec.shape == (3, 256)
    torch.testing.assert_close(vec, ref["target_vectors"], atol=1e-4, rtol=0)
    # the DC term is the mask area / N
    torch.testing.assert_close(vec[:, 0], crops.flatten(1).sum(1).float() / 128)


def test_decoding_matches_official(fx):
    """(max + min) / 2 binarisation of the inverse DCT: identical to the official cv2 decoding."""
    pp = fx["postprocessed"]
    vectors = fx["outputs"]["pred_vectors"][0, pp["query_index"]]
    ours = DCTMaskCoder(128, 256).decode(vectors)
    assert ours.shape == (100, 128, 128) and ours.dtype == torch.float32
    assert (ours.numpy().astype(np.uint8) == unpack_masks(pp["masks_128_packed"])).mean() >= 0.9999


def test_roundtrip_and_threshold_modes():
    coder = DCTMaskCoder(32, 32 * 32)  # all coefficients: exact inverse
    m = torch.zeros(2, 32, 32)
    m[0, 4:20, 6:30] = 1
    m[1, 10:31, 1:12] = 1
    vec = coder.dct(m)
    torch.testing.assert_close(coder.idct(vec), m.double(), atol=1e-5, rtol=0)
    assert torch.equal(coder.decode(vec), m)
    soft = DCTMaskCoder(32, 32 * 32, decode_threshold="fixed").decode(vec)
    torch.testing.assert_close(soft, m, atol=1e-5, rtol=0)
    # truncated: the minmax threshold still gives the shape back almost everywhere
    lossy = DCTMaskCoder(32, 64)
    assert (lossy.decode(lossy.dct(m)) == m).float().mean() > 0.95
    with pytest.raises(ValueError):
        DCTMaskCoder(decode_threshold="0.5")


def test_empty_and_mismatched_inputs():
    coder = DCTMaskCoder(16, 8)
    out = coder.encode(torch.zeros(0, 10, 12, dtype=torch.bool), torch.zeros(0, 4))
    assert out.shape == (0, 8)
    assert coder.decode(torch.zeros(0, 8)).shape == (0, 16, 16)
    with pytest.raises(ValueError):
        coder.encode(torch.zeros(2, 10, 12, dtype=torch.bool), torch.zeros(1, 4))
