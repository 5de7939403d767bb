"""StyleGAN2 generator ("skip") and discriminator ("resnet") for grayscale chest X-rays.

Follows NVlabs' stylegan2-ada-pytorch (Karras et al. 2020, "Analyzing and Improving the Image
Quality of StyleGAN"; "auto" config), with one image channel and without class conditioning.
Parameter and buffer names match NVlabs (`mapping.fc0`, `synthesis.b4.conv1`, `b4.fc`, ...)
so converted weights map one-to-one. The pure-PyTorch ops live in `ops.py`.

Shapes: z [N, z_dim]; w [N, w_dim]; ws ("W+") [N, num_ws, w_dim]; images [N, 1, R, R] in
roughly [-1, 1]. num_ws = 2*log2(R) - 2: the 4x4 block uses ws[0] (conv1) and ws[1] (ToRGB);
the block at resolution 2^k uses ws[2k-5], ws[2k-4] for its two convs and ws[2k-3] for its
ToRGB, i.e. each ToRGB shares its index with the next block's first conv, as in NVlabs.

Every model keeps its constructor arguments in `self.config` (plain JSON-able dict), so
`type(m)(**m.config)` rebuilds it; checkpoints store that JSON next to safetensors weights.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cxredit.models.ops import (
    DEFAULT_FILTER,
    LRELU_GAIN,
    Conv2dLayer,
    FullyConnected,
    act_clamp,
    assert_shape,
    modulated_conv2d,
    normalize_2nd_moment,
    setup_filter,
    upsample2d,
    use_fused_modconv,
)

__all__ = [
    "Discriminator",
    "Generator",
    "MappingNetwork",
    "MinibatchStd",
    "SynthesisNetwork",
    "count_params",
    "num_ws_for",
]

NOISE_MODES = ("random", "const", "none")


def num_ws_for(img_resolution: int) -> int:
    """Number of W+ vectors for a square power-of-two resolution: 2*log2(R) - 2."""
    return 2 * _log2(img_resolution) - 2


def _log2(res: int) -> int:
    if res < 4 or res & (res - 1):
        raise ValueError(f"resolution must be a power of two >= 4, got {res}")
    return int(math.log2(res))


def _channels(channel_base: int, channel_max: int, res: int) -> int:
    return min(channel_base // res, channel_max)


def _block_dtype(use_fp16: bool, x: Tensor) -> torch.dtype:
    # fp16 pays off only on GPUs (CPU half convolutions are slow or missing), so the
    # num_fp16_res blocks fall back to fp32 elsewhere; conv_clamp keeps fp16 from overflowing.
    return torch.float16 if use_fp16 and _fp16_device(x.device) else torch.float32


def _fp16_device(device: torch.device) -> bool:
    return device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# Mapping network


class MappingNetwork(nn.Module):
    """z -> w: 2nd-moment normalisation and an MLP with lrelu, plus the tracked mean w_avg.

    Args (forward):
        z: [N, z_dim] latent codes (any scale; they are normalised).
        psi: truncation strength; w <- w_avg + psi * (w - w_avg). 1 = none, 0 = w_avg.
        cutoff: truncate only the first `cutoff` of the num_ws vectors (None = all).
        update_emas: update w_avg <- lerp(mean_batch(w), w_avg, w_avg_beta) (training only).
        broadcast: return [N, num_ws, w_dim] (True) or [N, w_dim] (False).
    """

    def __init__(
        self,
        z_dim: int,  # input latent (Z) dimensionality
        w_dim: int,  # intermediate latent (W) dimensionality
        num_ws: int,  # number of W vectors the broadcast output repeats
        num_layers: int = 8,  # MLP depth (8 in config F, 2 in the stylegan2-ada "auto" config)
        lr_multiplier: float = 0.01,  # learning-rate multiplier of the MLP (slow mapping)
        w_avg_beta: float = 0.995,  # decay of the w_avg moving average per update
    ) -> None:
        super().__init__()
        self.config = dict(z_dim=z_dim, w_dim=w_dim, num_ws=num_ws, num_layers=num_layers,
                           lr_multiplier=lr_multiplier, w_avg_beta=w_avg_beta)
        self.z_dim, self.w_dim, self.num_ws = z_dim, w_dim, num_ws
        self.num_layers = num_layers
        self.w_avg_beta = w_avg_beta
        features = [z_dim] + [w_dim] * num_layers
        for idx in range(num_layers):
            layer = FullyConnected(features[idx], features[idx + 1], activation="lrelu",
                                   lr_multiplier=lr_multiplier)
            setattr(self, f"fc{idx}", layer)
        self.register_buffer("w_avg", torch.zeros([w_dim]))

    def forward(
        self,
        z: Tensor,
        psi: float = 1.0,
        cutoff: int | None = None,
        update_emas: bool = False,
        broadcast: bool = True,
    ) -> Tensor:
        assert_shape(z, [None, self.z_dim], "z")
        x = normalize_2nd_moment(z.float())
        for idx in range(self.num_layers):
            x = getattr(self, f"fc{idx}")(x)
        if update_emas:
            with torch.no_grad():
                self.w_avg.copy_(x.detach().mean(dim=0).lerp(self.w_avg, self.w_avg_beta))
        if broadcast:
            x = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if psi != 1:
            x = self.truncate(x, psi, cutoff)
        return x

    def truncate(self, ws: Tensor, psi: float, cutoff: int | None = None) -> Tensor:
        """Pull w [N, w_dim] or ws [N, num_ws, w_dim] toward w_avg by `psi`."""
        if cutoff is None or ws.ndim == 2:
            return self.w_avg.lerp(ws, psi)
        head = self.w_avg.lerp(ws[:, :cutoff], psi)
        return torch.cat([head, ws[:, cutoff:]], dim=1)


# ----------------------------------------------------------------------------------------------
# Synthesis network


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (+ optional 2x upsampling), per-pixel noise, bias, lrelu, clamp."""

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        w_dim: int,  # W dimensionality (input of the style affine)
        resolution: int,  # output resolution of this layer
        up: int = 1,  # 2 = upsample x2 (transposed conv + FIR)
        conv_clamp: float | None = None,  # clamp outputs to +-conv_clamp; None = off
        noise_generator: torch.Generator | None = None,  # draws the fixed noise_const map
        kernel_size: int = 3,  # conv kernel width
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution, self.up, self.conv_clamp = resolution, up, conv_clamp
        # Styles start at 1 (bias_init=1): the layer begins as an ordinary conv.
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        # No runtime weight gain: demodulation makes the conv invariant to the weight scale.
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size,
                                                kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.noise_strength = nn.Parameter(torch.zeros([]))
        self.register_buffer("noise_const",
                             torch.randn([resolution, resolution], generator=noise_generator))
        self.register_buffer("resample_filter", setup_filter(DEFAULT_FILTER), persistent=False)
        self.fused = use_fused_modconv(in_channels, out_channels, kernel_size, resolution // up,
                                       resolution)

    def forward(
        self,
        x: Tensor,
        w: Tensor,
        noise_mode: str = "random",
        fused: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """x: [N, I, R/up, R/up], w: [N, w_dim] -> [N, O, R, R]; fused None = layer default."""
        n = x.shape[0]
        in_res = self.resolution // self.up
        assert_shape(x, [None, self.in_channels, in_res, in_res], "SynthesisLayer input")
        styles = self.affine(w)
        # lrelu's gain sqrt(2) is folded into the modulated weights and bias (one fewer pass).
        y = modulated_conv2d(x, self.weight, styles, up=self.up,
                             fused=self.fused if fused is None else fused,
                             resample_filter=self.resample_filter, gain=LRELU_GAIN,
                             bias=self.bias * LRELU_GAIN)
        # Out-of-place add: y may be a view (fused path), and in-place ops on views make
        # autograd copy the whole base tensor in backward.
        if noise_mode == "random":
            noise = torch.randn([n, 1, self.resolution, self.resolution], generator=generator,
                                device=y.device, dtype=y.dtype)
            y = y + noise * (self.noise_strength * LRELU_GAIN).to(y.dtype)
        elif noise_mode == "const":
            y = y + self.noise_const.to(y.dtype) * (self.noise_strength * LRELU_GAIN)
        return act_clamp(y, "lrelu", self.conv_clamp)


class ToRGBLayer(nn.Module):
    """1x1 modulated conv to the image channels, without demodulation (linear, clamped)."""

    def __init__(
        self,
        in_channels: int,  # feature channels
        out_channels: int,  # image channels
        w_dim: int,  # W dimensionality
        conv_clamp: float | None = None,  # clamp outputs to +-conv_clamp; None = off
    ) -> None:
        super().__init__()
        self.conv_clamp = conv_clamp
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, 1, 1]))
        self.bias = nn.Parameter(torch.zeros([out_channels]))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: Tensor, w: Tensor, fused: bool | None = None) -> Tensor:
        """x: [N, I, R, R], w: [N, w_dim] -> [N, img_channels, R, R]."""
        styles = self.affine(w) * self.weight_gain
        # 1x1 to one channel: the fused path is a batched matmul, always the cheaper one.
        y = modulated_conv2d(x, self.weight, styles, demodulate=False,
                             fused=True if fused is None else fused, bias=self.bias)
        return act_clamp(y, "linear", self.conv_clamp)


class SynthesisBlock(nn.Module):
    """One resolution of the "skip" generator: [conv0 (up x2)] + conv1 + ToRGB."""

    def __init__(
        self,
        in_channels: int,  # input channels; 0 = first block (learned 4x4 constant input)
        out_channels: int,  # feature channels of this block
        w_dim: int,  # W dimensionality
        resolution: int,  # output resolution of this block
        img_channels: int,  # image channels
        conv_clamp: float | None = None,  # clamp conv outputs to +-conv_clamp
        use_fp16: bool = False,  # run this block in float16 (CUDA only)
        noise_generator: torch.Generator | None = None,  # draws the noise_const maps
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.resolution, self.img_channels = resolution, img_channels
        self.use_fp16 = use_fp16
        kw = dict(w_dim=w_dim, resolution=resolution, conv_clamp=conv_clamp,
                  noise_generator=noise_generator)
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn([out_channels, resolution, resolution]))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, up=2, **kw)
        self.conv1 = SynthesisLayer(out_channels, out_channels, **kw)
        self.torgb = ToRGBLayer(out_channels, img_channels, w_dim, conv_clamp=conv_clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.register_buffer("resample_filter", setup_filter(DEFAULT_FILTER), persistent=False)

    def forward(
        self,
        x: Tensor | None,
        img: Tensor | None,
        ws: Tensor,
        noise_mode: str = "random",
        fused: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """x: [N, I, R/2, R/2] (None for the first block); img: [N, C, R/2, R/2] or None;
        ws: [N, num_conv + 1, w_dim]  ->  (x [N, O, R, R], img [N, C, R, R] float32)."""
        assert_shape(ws, [None, self.num_conv + 1, None], "block ws")
        dtype = _block_dtype(self.use_fp16, ws)
        w_iter = iter(ws.unbind(dim=1))
        if self.in_channels == 0:
            x = self.const.to(dtype).unsqueeze(0).expand(ws.shape[0], -1, -1, -1)
        else:
            x = self.conv0(x.to(dtype), next(w_iter), noise_mode, fused, generator)
        x = self.conv1(x, next(w_iter), noise_mode, fused, generator)
        y = self.torgb(x, next(w_iter), fused=fused).float()
        if img is not None:
            assert_shape(img, [None, self.img_channels, self.resolution // 2, None], "img")
            # The running image stays float32 even under autocast: it accumulates every block.
            with torch.autocast(img.device.type, enabled=False):
                y = upsample2d(img, self.resample_filter).add_(y)
        return x, y


class SynthesisNetwork(nn.Module):
    """W+ -> image: learned 4x4 constant, then one `SynthesisBlock` per resolution up to R.

    channels(res) = min(channel_base // res, channel_max).
    """

    def __init__(
        self,
        w_dim: int,  # W dimensionality
        img_resolution: int,  # output resolution R (power of two >= 4)
        img_channels: int = 1,  # image channels (1 = grayscale X-ray)
        channel_base: int = 32768,  # channels(res) = min(channel_base // res, channel_max)
        channel_max: int = 512,  # cap on the channels of any layer
        conv_clamp: float | None = 256,  # clamp conv outputs to +-conv_clamp; None = off
        num_fp16_res: int = 0,  # run the N highest resolutions in fp16 (CUDA only, >= 8 px)
        noise_seed: int = 0,  # seed of the torch.Generator that draws the noise_const maps
    ) -> None:
        super().__init__()
        log2 = _log2(img_resolution)
        self.config = dict(w_dim=w_dim, img_resolution=img_resolution, img_channels=img_channels,
                           channel_base=channel_base, channel_max=channel_max,
                           conv_clamp=conv_clamp, num_fp16_res=num_fp16_res,
                           noise_seed=noise_seed)
        self.w_dim, self.img_resolution, self.img_channels = w_dim, img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(2, log2 + 1)]
        self.num_ws = num_ws_for(img_resolution)
        fp16_res = max(2 ** (log2 + 1 - num_fp16_res), 8)
        gen = torch.Generator().manual_seed(noise_seed)
        for res in self.block_resolutions:
            in_ch = _channels(channel_base, channel_max, res // 2) if res > 4 else 0
            block = SynthesisBlock(in_ch, _channels(channel_base, channel_max, res), w_dim, res,
                                   img_channels, conv_clamp=conv_clamp,
                                   use_fp16=res >= fp16_res, noise_generator=gen)
            setattr(self, f"b{res}", block)
        # None: every layer takes the modulated-conv path that is cheaper for its shapes
        # (`ops.use_fused_modconv`); True/False force one path everywhere.
        self.fused_modconv: bool | None = None

    def forward(
        self,
        ws: Tensor,
        noise_mode: str = "random",
        return_features: bool = False,
        generator: torch.Generator | None = None,
        fused_modconv: bool | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Render images.

        Args:
            ws: [N, num_ws, w_dim] (W+), or [N, w_dim] (W, broadcast to all layers).
            noise_mode: "random" (fresh per call, drawn with `generator`), "const" (the fixed
                per-layer noise_const maps: deterministic) or "none".
            return_features: also return the feature map each block ends with, computed in
                the same pass (for content losses over G's hidden layers).
            generator: torch.Generator for the random noise (on the device of `ws`).
            fused_modconv: force the modulated-conv path (None = `self.fused_modconv`, whose
                default None lets each layer pick the cheaper path for its shapes).

        Returns:
            img [N, img_channels, R, R] float32, or (img, features) where features[i] is
            [N, channels(4 * 2^i), 4 * 2^i, 4 * 2^i] for i = 0 .. log2(R) - 2.
        """
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        if ws.ndim == 2:
            ws = ws.unsqueeze(1).expand(-1, self.num_ws, -1)
        assert_shape(ws, [None, self.num_ws, self.w_dim], "ws")
        fused = self.fused_modconv if fused_modconv is None else fused_modconv
        ws = ws.float()
        x = img = None
        feats = []
        w_idx = 0
        for res in self.block_resolutions:
            block = getattr(self, f"b{res}")
            block_ws = ws.narrow(1, w_idx, block.num_conv + 1)
            x, img = block(x, img, block_ws, noise_mode, fused, generator)
            w_idx += block.num_conv
            feats.append(x)
        return (img, feats) if return_features else img


class Generator(nn.Module):
    """StyleGAN2 generator: `MappingNetwork` (z -> W) + `SynthesisNetwork` (W+ -> image).

    Example:
        >>> G = Generator(z_dim=64, w_dim=64, img_resolution=32, channel_base=1024,
        ...               channel_max=64)
        >>> img = G(torch.randn(4, 64))          # [4, 1, 32, 32]
        >>> G2 = Generator(**G.config)           # same architecture, fresh weights
    """

    def __init__(
        self,
        z_dim: int = 512,  # Z dimensionality
        w_dim: int = 512,  # W dimensionality
        img_resolution: int = 128,  # output resolution R (power of two >= 4)
        img_channels: int = 1,  # image channels (1 = grayscale)
        mapping_layers: int = 8,  # mapping MLP depth (2 in the stylegan2-ada "auto" config)
        channel_base: int = 32768,  # channels(res) = min(channel_base // res, channel_max)
        channel_max: int = 512,  # cap on the channels of any layer
        conv_clamp: float | None = 256,  # clamp conv outputs to +-conv_clamp; None = off
        num_fp16_res: int = 0,  # run the N highest resolutions in fp16 (CUDA only)
        mapping_lr_multiplier: float = 0.01,  # learning-rate multiplier of the mapping MLP
        w_avg_beta: float = 0.995,  # decay of the tracked w_avg
        noise_seed: int = 0,  # seed for the fixed noise_const maps
    ) -> None:
        super().__init__()
        self.config = dict(z_dim=z_dim, w_dim=w_dim, img_resolution=img_resolution,
                           img_channels=img_channels, mapping_layers=mapping_layers,
                           channel_base=channel_base, channel_max=channel_max,
                           conv_clamp=conv_clamp, num_fp16_res=num_fp16_res,
                           mapping_lr_multiplier=mapping_lr_multiplier, w_avg_beta=w_avg_beta,
                           noise_seed=noise_seed)
        self.synthesis = SynthesisNetwork(w_dim, img_resolution, img_channels, channel_base,
                                          channel_max, conv_clamp, num_fp16_res, noise_seed)
        self.mapping = MappingNetwork(z_dim, w_dim, self.synthesis.num_ws, mapping_layers,
                                      mapping_lr_multiplier, w_avg_beta)

    z_dim = property(lambda self: self.config["z_dim"])
    w_dim = property(lambda self: self.config["w_dim"])
    img_resolution = property(lambda self: self.config["img_resolution"])
    img_channels = property(lambda self: self.config["img_channels"])
    num_ws = property(lambda self: self.synthesis.num_ws)

    def forward(
        self,
        z: Tensor,
        psi: float = 1.0,
        cutoff: int | None = None,
        noise_mode: str = "random",
        update_emas: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """z: [N, z_dim] -> images [N, img_channels, R, R] (see `SynthesisNetwork.forward`)."""
        ws = self.mapping(z, psi=psi, cutoff=cutoff, update_emas=update_emas)
        return self.synthesis(ws, noise_mode=noise_mode, generator=generator)


# ----------------------------------------------------------------------------------------------
# Discriminator


class DiscriminatorBlock(nn.Module):
    """Residual block: conv0 3x3, conv1 3x3 down x2, skip 1x1 down x2; (skip + x) * sqrt(.5)."""

    def __init__(
        self,
        in_channels: int,  # input channels; 0 = first block (reads the image via FromRGB)
        tmp_channels: int,  # channels of conv0
        out_channels: int,  # output channels
        resolution: int,  # input resolution
        img_channels: int,  # image channels
        conv_clamp: float | None = None,  # clamp conv outputs to +-conv_clamp
        use_fp16: bool = False,  # run in float16 (CUDA only)
    ) -> None:
        super().__init__()
        self.in_channels, self.resolution, self.use_fp16 = in_channels, resolution, use_fp16
        self.img_channels = img_channels
        if in_channels == 0:
            self.fromrgb = Conv2dLayer(img_channels, tmp_channels, 1, activation="lrelu",
                                       conv_clamp=conv_clamp)
        self.conv0 = Conv2dLayer(tmp_channels, tmp_channels, 3, activation="lrelu",
                                 conv_clamp=conv_clamp)
        self.conv1 = Conv2dLayer(tmp_channels, out_channels, 3, activation="lrelu", down=2,
                                 conv_clamp=conv_clamp)
        self.skip = Conv2dLayer(tmp_channels, out_channels, 1, bias=False, down=2)

    def forward(self, x: Tensor) -> Tensor:
        """x: image [N, C_img, R, R] (first block) or [N, tmp, R, R] -> [N, out, R/2, R/2]."""
        r = self.resolution
        x = x.to(_block_dtype(self.use_fp16, x))
        if self.in_channels == 0:
            assert_shape(x, [None, self.img_channels, r, r], "image")
            x = self.fromrgb(x)
        else:
            assert_shape(x, [None, self.in_channels, r, r], "DiscriminatorBlock input")
        # The sqrt(1/2) residual gain goes into both branches' weights (no extra pass).
        y = self.skip(x, gain=math.sqrt(0.5))
        x = self.conv1(self.conv0(x), gain=math.sqrt(0.5))
        return y.add_(x)


class MinibatchStd(nn.Module):
    """Append the mean (over features and pixels) of per-group stddevs as extra channels.

    The batch N is split into N/G groups of G = min(group_size, N) samples, taking samples
    i, i + N/G, i + 2N/G, ... into one group (NVlabs' layout); N must be divisible by G.
    x: [N, C, H, W] -> [N, C + num_channels, H, W].
    """

    def __init__(self, group_size: int | None = 4, num_channels: int = 1) -> None:
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        g = n if self.group_size is None else min(self.group_size, n)
        f = self.num_channels
        if n % g or c % f:
            raise ValueError(f"minibatch std: batch {n} must be divisible by group size {g} "
                             f"(and channels {c} by {f})")
        y = x.float().reshape(g, -1, f, c // f, h, w)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # [n/g, F, c/F, H, W]
        y = y.mean(dim=(2, 3, 4)).reshape(-1, f, 1, 1)  # [n/g, F, 1, 1]
        y = y.repeat(g, 1, h, w).to(x.dtype)  # [N, F, H, W]
        return torch.cat([x, y], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}, num_channels={self.num_channels}"


class DiscriminatorEpilogue(nn.Module):
    """4x4 head: minibatch std, conv 3x3, FC (C*16 -> C), FC -> 1 logit."""

    def __init__(
        self,
        in_channels: int,  # channels at 4x4
        mbstd_group_size: int | None = 4,  # minibatch-std group size (None = whole batch)
        mbstd_num_channels: int = 1,  # minibatch-std features; 0 = disable
        conv_clamp: float | None = None,  # clamp conv outputs
        resolution: int = 4,  # input resolution
    ) -> None:
        super().__init__()
        self.in_channels, self.resolution = in_channels, resolution
        self.mbstd = MinibatchStd(mbstd_group_size, mbstd_num_channels) \
            if mbstd_num_channels > 0 else None
        self.conv = Conv2dLayer(in_channels + mbstd_num_channels, in_channels, 3,
                                activation="lrelu", conv_clamp=conv_clamp)
        self.fc = FullyConnected(in_channels * resolution**2, in_channels, activation="lrelu")
        self.out = FullyConnected(in_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: [N, C, 4, 4] -> logits [N, 1] float32."""
        r = self.resolution
        assert_shape(x, [None, self.in_channels, r, r], "DiscriminatorEpilogue input")
        x = x.float()
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        return self.out(self.fc(x.flatten(1)))


class Discriminator(nn.Module):
    """StyleGAN2 "resnet" discriminator: image [N, C, R, R] in [-1, 1] -> logits [N, 1]."""

    def __init__(
        self,
        img_resolution: int = 128,  # input resolution R (power of two >= 4)
        img_channels: int = 1,  # image channels (1 = grayscale)
        channel_base: int = 32768,  # channels(res) = min(channel_base // res, channel_max)
        channel_max: int = 512,  # cap on the channels of any layer
        mbstd_group_size: int | None = 4,  # minibatch-std group size (None = whole batch)
        mbstd_num_channels: int = 1,  # minibatch-std features; 0 = disable
        conv_clamp: float | None = 256,  # clamp conv outputs to +-conv_clamp; None = off
        num_fp16_res: int = 0,  # run the N highest resolutions in fp16 (CUDA only)
    ) -> None:
        super().__init__()
        log2 = _log2(img_resolution)
        self.config = dict(img_resolution=img_resolution, img_channels=img_channels,
                           channel_base=channel_base, channel_max=channel_max,
                           mbstd_group_size=mbstd_group_size,
                           mbstd_num_channels=mbstd_num_channels, conv_clamp=conv_clamp,
                           num_fp16_res=num_fp16_res)
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.block_resolutions = [2**i for i in range(log2, 2, -1)]
        fp16_res = max(2 ** (log2 + 1 - num_fp16_res), 8)
        for res in self.block_resolutions:
            ch = _channels(channel_base, channel_max, res)
            block = DiscriminatorBlock(ch if res < img_resolution else 0, ch,
                                       _channels(channel_base, channel_max, res // 2), res,
                                       img_channels, conv_clamp=conv_clamp,
                                       use_fp16=res >= fp16_res)
            setattr(self, f"b{res}", block)
        self.b4 = DiscriminatorEpilogue(_channels(channel_base, channel_max, 4), mbstd_group_size,
                                        mbstd_num_channels, conv_clamp=conv_clamp)

    def forward(self, img: Tensor) -> Tensor:
        """img: [N, img_channels, R, R] -> logits [N, 1] (float32)."""
        r = self.img_resolution
        assert_shape(img, [None, self.img_channels, r, r], "Discriminator input")
        x = img
        for res in self.block_resolutions:
            x = getattr(self, f"b{res}")(x)
        return self.b4(x).float()


def count_params(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
