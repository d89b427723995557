"""Shared deformable transformer: parity with the official SOLQ intermediates, two-stage
behaviour (SOIT), position encoding and neck."""

import math

import pytest
import torch

from solq_d2.modeling.neck import InputProjection, downsample_padding_mask
from solq_d2.modeling.position_encoding import PositionEmbeddingSine
from solq_d2.modeling.transformer import (
    MLP,
    DeformableTransformer,
    encoder_output_proposals,
    get_valid_ratio,
    inverse_sigmoid,
    proposal_pos_embed,
)

from ..conftest import load_fixture


@pytest.fixture(scope="module")
def solq_fx():
    fx = load_fixture("solq_r50_parity.pt")
    fx["sd32"] = {k: v.float() for k, v in fx["state_dict"].items()}
    return fx


def _official_transformer(sd, msda_impl="auto"):
    t = DeformableTransformer(
        d_model=384, nhead=8, dim_feedforward=1024, box_refine=True, msda_impl=msda_impl
    ).eval()
    tsd = {
        k[len("transformer.") :]: v
        for k, v in sd.items()
        if k.startswith("transformer.") and not k.startswith("transformer.decoder.bbox_embed.")
    }
    t.load_state_dict(tsd, strict=True)
    heads = []
    for i in range(6):
        m = MLP(384, 384, 4, 3)
        p = f"bbox_embed.{i}."
        m.load_state_dict({k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}, strict=True)
        heads.append(m)
    return t, heads


@pytest.mark.parametrize("msda_impl", ["auto", "pytorch"])
def test_transformer_matches_official_intermediates(solq_fx, msda_impl):
    """Encoder memory, decoder states, references and refined boxes from the official srcs, with
    the compiled deformable-attention kernel and with the PyTorch path."""
    sd = solq_fx["sd32"]
    t, heads = _official_transformer(sd, msda_impl)
    srcs = solq_fx["intermediates"]["srcs"]
    masks = [torch.zeros(s.shape[0], *s.shape[-2:], dtype=torch.bool) for s in srcs]
    pe = PositionEmbeddingSine(192)
    with torch.no_grad():
        out = t(srcs, masks, [pe(m) for m in masks], sd["query_embed.weight"], bbox_embed=heads)
    ref = solq_fx["intermediates"]
    torch.testing.assert_close(out.memory, ref["memory"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.hs, ref["hs"], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.init_reference, ref["init_reference"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.inter_references, ref["inter_references"], atol=1e-5, rtol=0)
    torch.testing.assert_close(
        out.pred_boxes, solq_fx["per_layer"]["pred_boxes"], atol=1e-5, rtol=0
    )
    assert out.enc_outputs_class is None and out.enc_topk_indices is None
    assert out.spatial_shapes.tolist() == [[40, 60], [20, 30], [10, 15], [5, 8]]
    assert out.level_start_index.tolist() == [0, 2400, 3000, 3150]


def _tiny_inputs(B=2, d=32, shapes=((16, 20), (8, 10), (4, 5)), pad_hw=((0, 0), (4, 8))):
    """Random srcs with bottom/right padding per image (padding in units of the finest level)."""
    g = torch.Generator().manual_seed(0)
    srcs, masks = [], []
    for lvl, (H, W) in enumerate(shapes):
        srcs.append(torch.randn(B, d, H, W, generator=g))
        m = torch.zeros(B, H, W, dtype=torch.bool)
        for b, (ph, pw) in enumerate(pad_hw):
            ph_l, pw_l = ph >> lvl, pw >> lvl
            if ph_l:
                m[b, H - ph_l :] = True
            if pw_l:
                m[b, :, W - pw_l :] = True
        masks.append(m)
    pe = PositionEmbeddingSine(d // 2)
    return srcs, masks, [pe(m) for m in masks]


def test_two_stage_queries_from_encoder_proposals():
    d, k, L = 32, 20, 3
    torch.manual_seed(0)
    t = DeformableTransformer(
        d_model=d,
        nhead=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        dim_feedforward=64,
        num_feature_levels=L,
        box_refine=True,
        two_stage=True,
        two_stage_num_proposals=k,
    ).eval()
    assert not hasattr(t, "reference_points")
    for name in ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm"):
        assert hasattr(t, name)
    enc_cls = torch.nn.Linear(d, 5)
    enc_box = MLP(d, d, 4, 3)
    heads = [MLP(d, d, 4, 3) for _ in range(2)]
    srcs, masks, pos = _tiny_inputs(d=d)
    with torch.no_grad():
        out = t(srcs, masks, pos, bbox_embed=heads, enc_class_embed=enc_cls, enc_bbox_embed=enc_box)
    S = sum(s.shape[-2] * s.shape[-1] for s in srcs)
    assert out.enc_outputs_class.shape == (2, S, 5)
    assert out.enc_outputs_coord.shape == (2, S, 4)
    # padded tokens have +inf proposals: their sigmoid box is exactly 1
    pad = out.mask_flatten
    assert pad[1].any() and not pad[0].any()
    assert torch.all(out.enc_outputs_coord[pad] == 1.0)
    # memory of padded tokens is zeroed before enc_output: they share one logit vector
    cls_pad = out.enc_outputs_class[pad]
    torch.testing.assert_close(cls_pad, cls_pad[:1].expand_as(cls_pad), atol=1e-6, rtol=0)
    # top-k by class channel 0, references = selected proposal boxes
    torch.testing.assert_close(
        out.enc_topk_indices, torch.topk(out.enc_outputs_class[..., 0], k, dim=1)[1]
    )
    sel = torch.gather(out.enc_outputs_coord, 1, out.enc_topk_indices[..., None].expand(-1, -1, 4))
    torch.testing.assert_close(out.init_reference, sel, atol=1e-6, rtol=0)
    assert out.hs.shape == (2, 2, k, d)
    # box refinement: each layer's reference is its predicted box
    torch.testing.assert_close(out.inter_references, out.pred_boxes, atol=0, rtol=0)
    with pytest.raises(ValueError, match="tokens"):
        t.two_stage_num_proposals = S + 1
        t(srcs, masks, pos, bbox_embed=heads, enc_class_embed=enc_cls, enc_bbox_embed=enc_box)


def test_encoder_output_proposals_by_hand():
    memory = torch.ones(1, 4 * 6 + 2 * 3, 2)
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, 5::6][:4] = True  # last column of level 0 (4x6) is padding -> valid W = 5
    mask[0, 24 + 2] = mask[0, 24 + 5] = True  # last column of level 1 (2x3)
    out_mem, props = encoder_output_proposals(memory, mask, [(4, 6), (2, 3)])
    # token (i=1, j=2) of level 0: ((2.5)/5, (1.5)/4, 0.05, 0.05)
    box = torch.tensor([2.5 / 5, 1.5 / 4, 0.05, 0.05])
    torch.testing.assert_close(props[0, 1 * 6 + 2], torch.log(box / (1 - box)))
    # level 1 token (0, 0): (0.5/2, 0.5/2, 0.1, 0.1)
    box = torch.tensor([0.25, 0.25, 0.1, 0.1])
    torch.testing.assert_close(props[0, 24], torch.log(box / (1 - box)))
    assert torch.isinf(props[0, 5]).all() and (out_mem[0, 5] == 0).all()  # padding
    # (j + 0.5) / 5 = 1.1 for j = 5 would be invalid anyway; j = 4 -> 0.9 is valid
    assert torch.isfinite(props[0, 4]).all() and (out_mem[0, 4] == 1).all()


def test_proposal_pos_embed_layout():
    """Activated coordinates, cx, cy, w, h order, interleaved sin/cos (SOIT fixture README 1)."""
    F = 8
    unact = torch.tensor([[[0.3, -1.0, 2.0, -0.5]]])
    emb = proposal_pos_embed(unact, num_pos_feats=F)
    assert emb.shape == (1, 1, 4 * F)
    for c in range(4):
        x = torch.sigmoid(unact[0, 0, c]) * 2 * math.pi
        for j in range(F // 2):
            arg = x / 10000 ** (2 * j / F)
            torch.testing.assert_close(emb[0, 0, c * F + 2 * j], torch.sin(arg))
            torch.testing.assert_close(emb[0, 0, c * F + 2 * j + 1], torch.cos(arg))


def test_position_encoding_by_hand_and_padding():
    F = 6
    pe = PositionEmbeddingSine(F)
    mask = torch.zeros(1, 5, 7, dtype=torch.bool)
    mask[:, 3:] = True
    mask[:, :, 4:] = True
    out = pe(mask)
    assert out.shape == (1, 2 * F, 5, 7)
    i, j = 1, 2  # valid H = 3, valid W = 4
    y = (i + 1 - 0.5) / (3 + 1e-6) * 2 * math.pi
    x = (j + 1 - 0.5) / (4 + 1e-6) * 2 * math.pi
    for k in range(F // 2):
        dt = 10000 ** (2 * k / F)
        torch.testing.assert_close(out[0, 2 * k, i, j], torch.tensor(math.sin(y / dt)))
        torch.testing.assert_close(out[0, 2 * k + 1, i, j], torch.tensor(math.cos(y / dt)))
        torch.testing.assert_close(out[0, F + 2 * k, i, j], torch.tensor(math.sin(x / dt)))
        torch.testing.assert_close(out[0, F + 2 * k + 1, i, j], torch.tensor(math.cos(x / dt)))
    # the valid region is encoded as the unpadded map would be
    alone = pe(torch.zeros(1, 3, 4, dtype=torch.bool))
    torch.testing.assert_close(out[..., :3, :4], alone)
    with pytest.raises(ValueError):
        PositionEmbeddingSine(5)


def test_valid_ratio_and_inverse_sigmoid():
    m = torch.zeros(2, 4, 8, dtype=torch.bool)
    m[1, 3:] = True
    m[1, :, 6:] = True
    torch.testing.assert_close(get_valid_ratio(m), torch.tensor([[1.0, 1.0], [0.75, 0.75]]))
    x = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(
        inverse_sigmoid(x), torch.tensor([math.log(1e-5), math.log(1 / 3), -math.log(1e-5)])
    )


def test_input_projection_levels_and_masks():
    proj = InputProjection([8, 16], hidden_dim=32, num_levels=4, bias=False)
    assert [k for k, _ in proj.named_parameters()][:2] == ["0.0.weight", "0.1.weight"]
    assert proj[2][0].kernel_size == (3, 3) and proj[2][0].in_channels == 16
    assert proj[3][0].in_channels == 32
    feats = [torch.randn(2, 8, 10, 12), torch.randn(2, 16, 5, 6)]
    mask = torch.zeros(2, 40, 48, dtype=torch.bool)
    mask[1, 30:] = True
    srcs, masks = proj(feats, mask)
    assert [tuple(s.shape[-2:]) for s in srcs] == [(10, 12), (5, 6), (3, 3), (2, 2)]
    assert [tuple(m.shape[-2:]) for m in masks] == [(10, 12), (5, 6), (3, 3), (2, 2)]
    torch.testing.assert_close(masks[0], downsample_padding_mask(mask, (10, 12)))
    assert masks[0][1, 8:].all() and not masks[0][1, :7].any() and not masks[0][0].any()
    with pytest.raises(ValueError):
        InputProjection([8], hidden_dim=30, num_levels=2)


def test_single_stage_gradients_reach_reference_points():
    """Layer-0 boxes are differentiable w.r.t. the initial reference (Deformable DETR); later
    references are detached."""
    d = 32
    t = DeformableTransformer(
        d_model=d,
        nhead=4,
        num_encoder_layers=1,
        num_decoder_layers=2,
        dim_feedforward=64,
        num_feature_levels=3,
        box_refine=True,
    )
    heads = [MLP(d, d, 4, 3) for _ in range(2)]
    srcs, masks, pos = _tiny_inputs(d=d)
    query = torch.randn(7, 2 * d)
    out = t(srcs, masks, pos, query, bbox_embed=heads)
    assert out.init_reference.shape == (2, 7, 2) and out.pred_boxes.shape == (2, 2, 7, 4)
    out.pred_boxes[0].sum().backward()
    assert t.reference_points.weight.grad.abs().sum() > 0
    t.zero_grad()
    with pytest.raises(ValueError, match="query_embed"):
        t(srcs, masks, pos, torch.randn(7, d), bbox_embed=heads)
    with pytest.raises(ValueError, match="box heads"):
        t(srcs, masks, pos, query, bbox_embed=None)
