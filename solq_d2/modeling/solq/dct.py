"""SOLQ's DCT mask coder, batched on the tensors' device.

Encode (training targets): crop each GT mask by its GT box to N x N with Detectron2's aligned
``ROIAlign`` (``BitMasks.crop_and_resize``), binarise at 0.5, orthonormal 2-D DCT-II
``F = A M A^T`` (``A[h, l] = sqrt((1 + sign h) / N) cos((l + 1/2) pi h / N)``, what ``cv2.dct``
computes), flatten row-major and keep the first ``n_keep`` coefficients in JPEG zig-zag order.

Decode (inference): put the vector back into an N x N array (zeros elsewhere), inverse DCT
``A^T F A``, then binarise with the official per-mask threshold ``(max + min) / 2`` (strict ``>``)
or return the soft mask for a fixed 0.5 threshold applied after pasting (``fast_solq``).
"""

import math

import torch
from detectron2.layers import ROIAlign
from torch import nn

__all__ = ["DCTMaskCoder", "dct_matrix", "zigzag_indices"]


def dct_matrix(n: int, dtype=torch.float64) -> torch.Tensor:
    """Orthonormal DCT-II matrix, ``A[h, l] = sqrt((1 + sign h) / n) cos((l + 1/2) pi h / n)``."""
    h = torch.arange(n, dtype=torch.float64)[:, None]
    l = torch.arange(n, dtype=torch.float64)[None, :]
    a = torch.cos((l + 0.5) * math.pi * h / n) * math.sqrt(2.0 / n)
    a[0] = math.sqrt(1.0 / n)
    return a.to(dtype)


def zigzag_indices(n: int, n_keep: int) -> torch.Tensor:
    """Row-major flat indices (row * n + col) of the first ``n_keep`` JPEG zig-zag positions.

    Anti-diagonal ``s = row + col`` from 0 upwards; on odd ``s`` the row increases along the
    diagonal, on even ``s`` it decreases: (0,0), (0,1), (1,0), (2,0), (1,1), (0,2), (0,3), ...
    """
    if not 0 < n_keep <= n * n:
        raise ValueError(f"n_keep must be in [1, {n * n}], got {n_keep}")
    out = []
    for s in range(2 * n - 1):
        rows = range(max(0, s - n + 1), min(s, n - 1) + 1)
        rows = rows if s % 2 == 1 else reversed(rows)
        out.extend(r * n + (s - r) for r in rows)
        if len(out) >= n_keep:
            break
    return torch.tensor(out[:n_keep], dtype=torch.int64)


class DCTMaskCoder(nn.Module):
    """Encode masks to and decode masks from ``n_keep`` zig-zag DCT coefficients.

    The DCT matrix and the zig-zag table are non-persistent buffers (they follow the module's
    device and are not stored in checkpoints).

    Args:
        mask_size: N, the side of the box-cropped mask (SOLQ ``--gt_mask_len`` 128).
        n_keep: number of coefficients kept (SOLQ ``--n_keep`` 256).
        decode_threshold: "minmax" (official SOLQ, the released models: binarise each decoded
            mask at ``(max + min) / 2``) or "fixed" (return the soft mask; the caller pastes it
            with threshold 0.5, as ``fast_solq.py``).
    """

    def __init__(self, mask_size: int = 128, n_keep: int = 256, decode_threshold: str = "minmax"):
        super().__init__()
        if decode_threshold not in ("minmax", "fixed"):
            raise ValueError(
                f"decode_threshold must be 'minmax' or 'fixed', got {decode_threshold!r}"
            )
        self.mask_size = mask_size
        self.n_keep = n_keep
        self.decode_threshold = decode_threshold
        zz = zigzag_indices(mask_size, n_keep)
        # highest row/column reached by the kept coefficients: decoding only needs that block
        self.block = int(max((zz // mask_size).max(), (zz % mask_size).max())) + 1
        self.register_buffer("zigzag", zz, persistent=False)
        self.register_buffer("dct_f64", dct_matrix(mask_size, torch.float64), persistent=False)
        self._crop = ROIAlign((mask_size, mask_size), 1.0, 0, aligned=True)

    def crop_masks(self, masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``BitMasks(masks).crop_and_resize(boxes, N)``: aligned ROIAlign of each mask inside its
        own box, adaptive sampling, then ``>= 0.5``.

        Args:
            masks: (K, H, W) bool/uint8/float masks of one image.
            boxes: (K, 4) xyxy boxes in pixels of that image.

        Returns:
            (K, N, N) bool.
        """
        if masks.shape[0] != boxes.shape[0]:
            raise ValueError(f"{masks.shape[0]} masks but {boxes.shape[0]} boxes")
        N = self.mask_size
        if masks.shape[0] == 0:
            return torch.zeros((0, N, N), dtype=torch.bool, device=masks.device)
        batch_inds = torch.arange(len(boxes), device=masks.device, dtype=torch.float32)[:, None]
        rois = torch.cat([batch_inds, boxes.to(device=masks.device, dtype=torch.float32)], 1)
        out = self._crop(masks.to(dtype=torch.float32)[:, None], rois).squeeze(1)
        return out >= 0.5

    def dct(self, masks: torch.Tensor) -> torch.Tensor:
        """Kept zig-zag coefficients of the orthonormal 2-D DCT-II of (K, N, N) masks -> (K, n_keep)
        float32. Computed in float64 (the official float32 ``cv2.dct`` is within ~1e-5 of it)."""
        A = self.dct_f64
        coeffs = A @ masks.to(torch.float64) @ A.t()
        return coeffs.flatten(1)[:, self.zigzag].to(torch.float32)

    def encode(self, masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Target vectors of one image's instances.

        Args:
            masks: (K, H, W) instance masks at the network-input resolution.
            boxes: (K, 4) xyxy GT boxes in pixels of the same image.

        Returns:
            (K, n_keep) float32.
        """
        return self.dct(self.crop_masks(masks, boxes))

    def idct(self, vectors: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`dct` with zeros for the dropped coefficients: (K, n_keep) ->
        (K, N, N) float64 (``cv2.idct`` of the official decoder is float64)."""
        N, b = self.mask_size, self.block
        K = vectors.shape[0]
        coeffs = vectors.new_zeros((K, N * N), dtype=torch.float64)
        coeffs[:, self.zigzag] = vectors.to(torch.float64)
        block = coeffs.view(K, N, N)[:, :b, :b]  # all kept coefficients lie in this corner
        A = self.dct_f64[:b]
        return A.t() @ block @ A

    def decode(self, vectors: torch.Tensor) -> torch.Tensor:
        """Masks (K, N, N) float32 in the box frame: binary {0, 1} ("minmax") or soft ("fixed")."""
        rec = self.idct(vectors)
        if self.decode_threshold == "fixed":
            return rec.to(torch.float32)
        flat = rec.flatten(1)
        thr = (flat.max(1).values + flat.min(1).values) / 2
        return (rec > thr[:, None, None]).to(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"mask_size={self.mask_size}, n_keep={self.n_keep}, "
            f"decode_threshold={self.decode_threshold!r}"
        )
