"""The single-patch U-Net with position-wise conditioning and Global Content Conditioning (GCC)."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from patchgen.runtime.layout import crop_centre, pool_gcc

from .config import ModelConfig

GROUPS = 8  # GroupNorm groups; every width is a multiple of 8 (ModelConfig checks base_width)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al.; Ho et al. 2020): [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, then the conditioning as scale/shift: h = norm(h) * (1 + scale) + shift."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(GROUPS, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels do not split into {heads} attention heads")
        self.heads = heads
        self.norm = nn.GroupNorm(GROUPS, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        # A = softmax(q^T k / sqrt(d)) over key positions j; out_i = sum_j A_ij v_j. Plain MatMul/Softmax in ONNX.
        attn = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(c // self.heads), dim=-1)  # [B, heads, HW, HW]
        out = (v @ attn.transpose(-1, -2)).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def edge_masks(config: ModelConfig) -> torch.Tensor:
    """[G*G, W*W] float32, W = P + 2M: row k = i*G + j is 1 where patch (i, j)'s window lies on the image and 0
    where it lies in the zero padding beyond the image's edge."""
    p, m, g = config.patch_size, config.halo, config.grid
    offsets = torch.arange(config.window_size) - m  # window pixel r is image pixel (i P + r - M)
    inside = torch.stack([((i * p + offsets) >= 0) & ((i * p + offsets) < config.image_size) for i in range(g)])
    masks = inside[:, None, :, None] & inside[None, :, None, :]  # [Gi, Gj, rows, cols]
    return masks.reshape(g * g, -1).float()


class PatchUNet(nn.Module):
    """Denoiser for ONE patch: (x [B,C,W,W], t [B], pos [B,G*G], gcc [B,C,P,P]) -> prediction [B,C,P,P].

    W = P + 2M: with a halo M the input is the patch's window of x_t (`patchgen.runtime.layout.window_view`,
    M pixels of its neighbours on each side, zeros beyond the image), the U-Net runs on the whole window and
    only the centre P x P is returned: the overlap-tile strategy of Ronneberger et al. (2015). GCC is
    zero-padded to the window, and `edge_mask` adds a channel that marks the image (1) against the padding (0).
    The output is whatever `config.prediction` names (eps, v or x0); `EpsDenoiser`
    turns it into eps. With grid 1 and both conditionings off this is the
    ordinary full-image DDPM U-Net.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        w, c = config.base_width, config.channels
        emb_dim = 4 * w
        self._add_conditioning(w, emb_dim)  # the modules are created in this order: it fixes their initial weights
        if config.edge_mask:
            self.register_buffer("edge_masks", edge_masks(config), persistent=False)
        self.conv_in = nn.Conv2d(c * (2 if config.use_gcc else 1) + int(config.edge_mask), w, 3, padding=1)
        ch = self._add_levels(w, emb_dim)
        self.norm_out = nn.GroupNorm(GROUPS, ch)
        self.conv_out = nn.Conv2d(ch, c, 3, padding=1)

    def _add_conditioning(self, w: int, emb_dim: int) -> None:
        """cat(sinusoid(t), GELU(Linear(pos))) -> Linear -> GELU -> Linear (the paper's position MLP); the
        global context vector: GCC pooled to k x k cells -> MLP, added to that embedding."""
        config = self.config
        cond_in = w
        if config.use_position:
            self.pos_embed = nn.Sequential(nn.Linear(config.grid**2, w), nn.GELU())
            cond_in += w
        self.cond_mlp = nn.Sequential(nn.Linear(cond_in, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))
        if config.global_context:
            cells = config.channels * config.global_context**2
            self.global_mlp = nn.Sequential(nn.Linear(cells, emb_dim), nn.GELU(), nn.Linear(emb_dim, emb_dim))

    def _add_levels(self, w: int, emb_dim: int) -> int:
        """The down path, the middle (ResBlock, attention, ResBlock) and the up path with its skip
        connections; returns the channels at the output."""
        config = self.config
        widths = [w * m for m in config.channel_mults]
        res, ch, skips = config.patch_size, w, [w]
        self.down = nn.ModuleList()
        for level, width in enumerate(widths):
            for _ in range(config.num_res_blocks):
                self.down.append(self._block(ch, width, emb_dim, res))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)
                res //= 2
        self.mid = nn.ModuleList([ResBlock(ch, ch, emb_dim, config.dropout),
                                  SelfAttention(ch, config.attention_heads),
                                  ResBlock(ch, ch, emb_dim, config.dropout)])
        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(self._block(ch + skips.pop(), width, emb_dim, res))
                ch = width
            if level > 0:
                self.up.append(Upsample(ch))
                res *= 2
        return ch

    def _block(self, c_in: int, c_out: int, emb_dim: int, res: int) -> nn.Module:
        block = ResBlock(c_in, c_out, emb_dim, self.config.dropout)
        if res in self.config.attention_resolutions:
            return nn.ModuleList([block, SelfAttention(c_out, self.config.attention_heads)])
        return nn.ModuleList([block])

    def embed(self, t: torch.Tensor, pos: Optional[torch.Tensor], gcc: Optional[torch.Tensor]) -> torch.Tensor:
        cond = timestep_embedding(t, self.config.base_width)
        if self.config.use_position:
            cond = torch.cat([cond, self.pos_embed(pos)], dim=1)
        emb = self.cond_mlp(cond)
        if self.config.global_context:
            emb = emb + self.global_mlp(pool_gcc(gcc, self.config.global_context).flatten(1))
        return emb

    def forward(self, x: torch.Tensor, t: torch.Tensor, pos: Optional[torch.Tensor] = None,
                gcc: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.embed(t, pos, gcc)
        m, inputs = self.config.halo, [x]
        if self.config.use_gcc:
            inputs.append(F.pad(gcc, (m, m, m, m)) if m else gcc)
        if self.config.edge_mask:
            inputs.append((pos @ self.edge_masks).reshape(x.shape[0], 1, *x.shape[2:]))
        h = self.conv_in(torch.cat(inputs, dim=1) if len(inputs) > 1 else x)
        hs = [h]
        for layer in self.down:
            h = self._run_layer(layer, h, emb)
            hs.append(h)
        h = self.mid[0](h, emb)
        h = self.mid[1](h)
        h = self.mid[2](h, emb)
        for layer in self.up:
            h = self._run_layer(layer, torch.cat([h, hs.pop()], dim=1) if not isinstance(layer, Upsample) else h, emb)
        return crop_centre(self.conv_out(F.silu(self.norm_out(h))), m)

    @staticmethod
    def _run_layer(layer: nn.Module, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if isinstance(layer, (Downsample, Upsample)):
            return layer(h)
        h = layer[0](h, emb)
        return layer[1](h) if len(layer) > 1 else h
