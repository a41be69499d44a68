"""A pixel-space patch discriminator for DMD / DMD2 (``dmd.pixel_gan_g_weight > 0``).

DMD2's GAN head (Yin et al. 2024, Sec. 4.2) classifies the fake score's *bottleneck* features of a noised
sample: with t ~ U[0, T) and an 8x8 bottleneck on a 32x32 image it sees shape and class, but hardly the
pixel-scale texture that separates our one-step students from real data (BENCHMARKS.md, "What limits the
one-step student"). This discriminator looks at the clean sample itself, patch by patch (PatchGAN, Isola et
al. 2017), so its signal is local texture:

    D(x, y) = mean_{patches} f(x) + <embed(y), pool(h(x))>          (B,)   projection term: Miyato & Koyama 2018
    L_D = softplus(D(sg G(z))) + softplus(-D(x_real)) + r1 / 2 * E ||grad_x D(x_real)||^2   (R1: Mescheder 2018)
    L_G = softplus(-D(G(z)))                                         (non-saturating, as DMD2 Eq. 3)

It is trained in every critic update (a module of the critic player: the critic's AdamW, in its own param group
at ``dmd.pixel_gan_lr`` when that is > 0) and enters the generator loss with weight ``dmd.pixel_gan_g_weight``;
the critic's with ``dmd.pixel_gan_d_weight``. The
projection term is used for class-conditional teachers (integer labels); text teachers get the unconditional D.
"""
from __future__ import annotations

import torch
import torch.nn as nn



class PixelDiscriminator(nn.Module):
    """Patch discriminator on (B, C, H, W) images in the data range (``video``: on clips (B, C, F, H, W), with 3-D
    convolutions over (frame, height, width) patches: flicker and jumps between frames are texture it sees).

    conv3x3 (C -> w), then ``downs`` x [conv4x4 stride 2, width doubling], LeakyReLU(0.2) after each, then a
    1x1 conv to a logit per patch (receptive field ~ 3 + 6 * (2^downs - 1) pixels: 21 for downs = 2). The
    patch logits are averaged; with ``num_classes > 0`` the projection term (zero-initialised) is added.
    """

    def __init__(self, channels: int, width: int = 32, downs: int = 2, num_classes: int = 0, video: bool = False):
        super().__init__()
        if video:  # spatio-temporal patches of clips (B, C, F, H, W): 3-frame kernels, time kept at full rate
            first, down, last = (nn.Conv3d(channels, width, 3, 1, 1), lambda c: nn.Conv3d(c, 2 * c, (3, 4, 4), (1, 2, 2),
                                                                                        1), nn.Conv3d)
        else:
            first, down, last = nn.Conv2d(channels, width, 3, 1, 1), lambda c: nn.Conv2d(c, 2 * c, 4, 2, 1), nn.Conv2d
        layers, c = [first, nn.LeakyReLU(0.2)], width
        for _ in range(downs):
            layers += [down(c), nn.LeakyReLU(0.2)]
            c *= 2
        self.body = nn.Sequential(*layers)
        self.logit = last(c, 1, 1)
        self.embed = nn.Embedding(num_classes, c) if num_classes > 0 else None
        if self.embed is not None:  # zero: D starts unconditional (an N(0, 1) table gives logits of ~+-50)
            nn.init.zeros_(self.embed.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # -> (B,)
        h = self.body(x.float())                                  # (B, c, [F,] H / 2^downs, W / 2^downs)
        out = self.logit(h).flatten(1).mean(1)                   # (B,) mean patch logit
        if self.embed is not None and labels is not None:  # integer labels (:func:`labels_of`)
            out = out + (self.embed(labels.long()) * h.mean(tuple(range(2, h.ndim)))).sum(1)
        return out


def labels_of(cond) -> torch.Tensor | None:
    """Integer class labels of a condition (None for text embeddings / unconditional)."""
    if isinstance(cond, torch.Tensor) and not cond.is_floating_point():
        return cond
    return None

