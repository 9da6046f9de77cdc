"""Class-conditional U-Net for 32x32x3 images and its preconditioned denoiser.

The network F is a DDPM++-style U-Net (Song et al. 2021, appendix H) with a Gaussian Fourier embedding of
the noise level (Tancik et al. 2020; Song et al. 2021, appendix H.2) and a learned label embedding with an
extra "no label" token, so that one network gives both the conditional and the unconditional score needed
by classifier-free guidance (Ho and Salimans 2022).

`Denoiser` wraps F with the preconditioning of Karras, Aittala, Aila and Laine, "Elucidating the Design Space
of Diffusion-Based Generative Models", NeurIPS 2022, eq. (7) and Table 1:
    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), label).
The score of the noisy data at noise level sigma is then (D(x, sigma) - x) / sigma^2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES  # label token meaning "no label": the unconditional model


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the U-Net."""

    channels: int = 32  # channels at 32x32; level i has channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one entry per resolution, halving the resolution after each
    num_res_blocks: int = 1  # residual blocks per resolution in the encoder (the decoder has one more)
    attention_resolutions: tuple[int, ...] = ()  # resolutions (16, 8, ...) with a self-attention block
    dropout: float = 0.0
    fourier_scale: float = 16.0  # std of the random Fourier frequencies of the noise-level embedding
    num_classes: int = NUM_CLASSES
    image_channels: int = 3
    extra: dict = field(default_factory=dict, compare=False)


MODEL_SIZES: dict[str, UNetConfig] = {
    # 1.1M parameters, 0.49 GFLOPs per 32x32 image (forward_gflops): trains in minutes on 2 CPU cores.
    "tiny": UNetConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=()),
    # 6.9M parameters, 2.9 GFLOPs per image: hours on a CPU, minutes on a GPU.
    "small": UNetConfig(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(8,), dropout=0.1),
    # 38M parameters, 12.4 GFLOPs per image, close to the DDPM++ CIFAR-10 network: meant for a GPU.
    "base": UNetConfig(
        channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(16,), dropout=0.1
    ),
}


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=1e-6)


class GaussianFourierProjection(nn.Module):
    """Embed a scalar with fixed random frequencies: [sin(2 pi w c), cos(2 pi w c)], w ~ N(0, scale^2)."""

    def __init__(self, dim: int, scale: float):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(dim // 2) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * c_noise[:, None] * self.frequencies[None, :]  # (B, dim / 2)
        return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResBlock(nn.Module):
    """Residual block with the embedding added as a per-channel scale and shift (adaptive group norm)."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float):
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, 2 * out_channels)
        self.norm2 = _group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.embed(embedding)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return (h + self.skip(x)) / math.sqrt(2)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of a feature map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(batch, 3, channels, height * width).unbind(1)  # 3 x (B, C, HW)
        h = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, HW, C)
        h = h.transpose(1, 2).reshape(batch, channels, height, width)
        return (x + self.proj(h)) / math.sqrt(2)


class UNet(nn.Module):
    """The raw network F(x, c_noise, label) of a 32x32 class-conditional denoiser."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.channels
        embed_dim = 4 * channels

        self.noise_embedding = GaussianFourierProjection(channels, config.fourier_scale)
        self.label_embedding = nn.Embedding(config.num_classes + 1, channels)  # last row: NULL_LABEL
        self.embed_mlp = nn.Sequential(nn.Linear(channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        self.input_conv = nn.Conv2d(config.image_channels, channels, 3, padding=1)

        # Encoder: num_res_blocks blocks per level, then a strided convolution, except at the last level.
        self.down = nn.ModuleList()
        skip_channels = [channels]
        current, resolution = channels, 32
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.down.append(self._block(current, channels * mult, embed_dim, resolution))
                current = channels * mult
                skip_channels.append(current)
            if level < len(config.channel_mult) - 1:
                self.down.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
                skip_channels.append(current)
                resolution //= 2

        self.middle = nn.ModuleList(
            [ResBlock(current, current, embed_dim, config.dropout), AttentionBlock(current),
             ResBlock(current, current, embed_dim, config.dropout)]
        )

        # Decoder: num_res_blocks + 1 blocks per level, each taking one skip connection, then an upsampling.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.num_res_blocks + 1):
                self.up.append(self._block(current + skip_channels.pop(), channels * mult, embed_dim, resolution))
                current = channels * mult
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(current, current, 3, padding=1)))
                resolution *= 2
        assert not skip_channels

        self.output_norm = _group_norm(current)
        self.output_conv = nn.Conv2d(current, config.image_channels, 3, padding=1)
        nn.init.zeros_(self.output_conv.weight)
        nn.init.zeros_(self.output_conv.bias)

    def _block(self, in_channels: int, out_channels: int, embed_dim: int, resolution: int) -> nn.Module:
        block = ResBlock(in_channels, out_channels, embed_dim, self.config.dropout)
        if resolution in self.config.attention_resolutions:
            return nn.ModuleList([block, AttentionBlock(out_channels)])
        return block

    @staticmethod
    def _run_block(module: nn.Module, h: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        if isinstance(module, ResBlock):
            return module(h, embedding)
        if isinstance(module, nn.ModuleList):  # a residual block followed by attention
            return module[1](module[0](h, embedding))
        if isinstance(module, AttentionBlock):
            return module(h)
        return module(h)  # strided convolution or upsampling

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        embedding = self.noise_embedding(c_noise) + self.label_embedding(labels)  # (B, channels)
        embedding = self.embed_mlp(embedding)  # (B, 4 * channels)

        h = self.input_conv(x)
        skips = [h]
        for module in self.down:
            h = self._run_block(module, h, embedding)
            skips.append(h)
        for module in self.middle:
            h = self._run_block(module, h, embedding)
        for module in self.up:
            if isinstance(module, nn.Sequential):
                h = module(h)
            else:
                h = self._run_block(module, torch.cat([h, skips.pop()], dim=1), embedding)
        return self.output_conv(F.silu(self.output_norm(h)))


class Denoiser(nn.Module):
    """D(x, sigma, label): the preconditioned U-Net of Karras et al. 2022, eq. (7).

    Args:
        config: architecture of the U-Net.
        sigma_data: standard deviation of the data (0.5 for images in [-1, 1]).
        size: name of the size in MODEL_SIZES, kept in `config()` so that checkpoints can be checked.
    """

    def __init__(self, config: UNetConfig, sigma_data: float = 0.5, size: str | None = None):
        super().__init__()
        self.unet = UNet(config)
        self.sigma_data = float(sigma_data)
        self.size = size

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Return the denoised estimate of x0 (B, C, H, W) from x = x0 + sigma n, sigma of shape (B,)."""
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)  # (B, 1, 1, 1)
        sigma_data = self.sigma_data
        c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
        c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
        c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        out = self.unet((c_in * x).to(x.dtype), c_noise, labels)
        return c_skip * x + c_out * out.to(torch.float32)

    def config(self) -> dict:
        """JSON-serialisable settings; `denoiser_from_config` rebuilds the network from them."""
        unet = asdict(self.unet.config)
        unet.pop("extra")
        return {"size": self.size, "sigma_data": self.sigma_data, "unet": unet}


def build_denoiser(size: str = "tiny", sigma_data: float = 0.5, dropout: float | None = None) -> Denoiser:
    """Build a denoiser of one of the MODEL_SIZES, optionally overriding its dropout rate."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    config = MODEL_SIZES[size]
    if dropout is not None:
        config = UNetConfig(**{**asdict(config), "dropout": float(dropout)})
    return Denoiser(config, sigma_data=sigma_data, size=size)


def denoiser_from_config(config: dict) -> Denoiser:
    """Rebuild a denoiser from `Denoiser.config()`."""
    unet = dict(config["unet"])
    for key in ("channel_mult", "attention_resolutions"):
        unet[key] = tuple(unet[key])
    return Denoiser(UNetConfig(**unet), sigma_data=config["sigma_data"], size=config.get("size"))


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def forward_gflops(denoiser: Denoiser) -> float:
    """Measure the GFLOPs of one denoiser evaluation on one 32x32 image (a multiply-add counts as 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, denoiser.unet.config.image_channels, 32, 32)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        denoiser(x, torch.ones(1), torch.zeros(1, dtype=torch.long))
    return counter.get_total_flops() / 1e9
