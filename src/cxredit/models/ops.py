"""StyleGAN2 building blocks in plain PyTorch: equalized-lr layers, FIR resampling, modconv.

Everything here runs on any device PyTorch supports (no custom CUDA kernels, no `.cuda()`);
devices and dtypes are taken from the inputs. The maths follows NVlabs' StyleGAN2 (config F /
stylegan2-ada "auto") so that the behaviour, the initialisation and the parameter layout match
the reference implementation, but the ops are arranged for speed on stock PyTorch:

* Equalized learning rate: parameters are stored ~N(0, 1) and scaled at run time by
  1/sqrt(fan_in), so Adam sees every layer at the same scale (Karras et al. 2018).
* Activation gain, layer gain and the runtime weight gain are all folded into the (small)
  weight tensor before the convolution, and the bias goes into the convolution's own bias
  argument, so after a conv the only passes over the (large) activations are the noise add,
  the activation and the optional clamp. NVlabs' reference `bias_act` makes four passes.
* FIR up/down-sampling uses depthwise `conv2d`/`conv_transpose2d` with stride 2, so no work is
  spent on inserted zeros (upsampling) or on pixels that are thrown away (downsampling), and
  its backward is written by hand (the stock depthwise backward is slow on CPU).
* The modulated conv has a fused path (per-sample weights, batch folded into conv groups) and
  a reference path (scale activations); each layer takes the cheaper one for its shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LRELU_SLOPE = 0.2
LRELU_GAIN = math.sqrt(2.0)  # keeps the second moment of lrelu(N(0,1)) outputs near 1
ACTIVATION_GAINS = {"linear": 1.0, "lrelu": LRELU_GAIN}
DEFAULT_FILTER = (1.0, 3.0, 3.0, 1.0)  # binomial low-pass used by StyleGAN2 for all resampling

__all__ = [
    "ACTIVATION_GAINS",
    "Conv2dLayer",
    "FullyConnected",
    "act_clamp",
    "assert_shape",
    "bias_act",
    "conv2d_resample",
    "demodulated_weight",
    "downsample2d",
    "filter2d",
    "modulated_conv2d",
    "modulation_coefs",
    "normalize_2nd_moment",
    "setup_filter",
    "upsample2d",
    "use_fused_modconv",
]


def assert_shape(x: Tensor, shape: Sequence[int | None], name: str = "tensor") -> None:
    """Raise `ValueError` unless `x.shape` matches `shape` (None matches any size)."""
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "[" + ",".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(x.shape)}")


def normalize_2nd_moment(x: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """Scale `x` so that the mean of its squares along `dim` is 1 (pixel norm of z)."""
    return x * (x.square().mean(dim=dim, keepdim=True) + eps).rsqrt()


# ----------------------------------------------------------------------------------------------
# Bias + activation


def bias_act(
    x: Tensor,
    b: Tensor | None = None,
    act: str = "linear",
    gain: float = 1.0,
    clamp: float | None = None,
) -> Tensor:
    """Plain-torch equivalent of NVlabs' `bias_act`: `clamp(act(x + b) * gain, -clamp, clamp)`.

    The layers in this package do not call it: they fold `gain` into their weights and `b`
    into the conv, then call `act_clamp`. It is kept as the readable reference (and for
    callers that hold a bare activation tensor).

    Args:
        x: [N, C, ...] activations.
        b: [C] bias added along dim 1, or None.
        act: "linear" or "lrelu" (slope 0.2).
        gain: positive scale applied after the activation.
        clamp: clamp the output to [-clamp, clamp]; None = no clamping.

    Returns:
        Tensor of the shape of `x`.
    """
    if act not in ACTIVATION_GAINS:
        raise ValueError(f"unknown activation {act!r}; expected one of {list(ACTIVATION_GAINS)}")
    if b is not None:
        x = x + b.reshape([1, -1] + [1] * (x.ndim - 2))
    if act == "lrelu":
        x = F.leaky_relu(x, LRELU_SLOPE)
    if gain != 1.0:
        x = x * gain
    if clamp is not None:
        x = x.clamp(-clamp, clamp)
    return x


def act_clamp(x: Tensor, act: str, clamp: float | None) -> Tensor:
    """Activation then clamp, for a *fresh* tensor nobody else holds (e.g. a conv output).

    Bias and gains are already folded into the conv, so this is the whole of `bias_act`:
    lrelu runs in place (its backward needs only its output) unless `x` is a view (autograd
    would then copy the whole base tensor in backward), and the clamp is `hardtanh`, whose
    backward is one fused masked pass (`clamp`'s backward costs four: lt, gt, and, where).
    """
    if act == "lrelu":
        inplace = x._base is None
        x = F.leaky_relu_(x, LRELU_SLOPE) if inplace else F.leaky_relu(x, LRELU_SLOPE)
    if clamp is not None:
        x = F.hardtanh(x, -clamp, clamp)
    return x


# ----------------------------------------------------------------------------------------------
# FIR filtering and resampling (upfirdn2d equivalents)


def setup_filter(f: Sequence[float] = DEFAULT_FILTER) -> Tensor:
    """Separable 1-D taps -> normalized 2-D FIR kernel [k, k] with unit DC gain."""
    t = torch.as_tensor(f, dtype=torch.float32)
    if t.ndim != 1:
        raise ValueError("filter taps must be 1-D")
    k = torch.outer(t, t)
    return k / k.sum()


class _DepthwiseFIR(torch.autograd.Function):
    """Depthwise conv (or transposed conv) with a constant filter, differentiated by hand.

    The gradient of a depthwise conv w.r.t. its input is the transposed conv with the same
    filter and vice versa, so backward calls this same op in the other direction. PyTorch's
    generic depthwise `convolution_backward` on CPU is several times slower than a forward
    depthwise conv; the forward kernels are fast in both directions. Backward is itself
    differentiable (it calls `apply`), so R1 / path-length double backprop works.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, transpose, out_hw):
        ctx.save_for_backward(weight)
        ctx.conf = (stride, padding, transpose, tuple(x.shape[2:]), bias is not None)
        c = x.shape[1]
        if not transpose:
            return F.conv2d(x, weight, bias, stride=stride, padding=padding, groups=c)
        k = weight.shape[-1]
        op = [o - ((i - 1) * stride - 2 * padding + k) for o, i in zip(out_hw, x.shape[2:])]
        return F.conv_transpose2d(x, weight, bias, stride=stride, padding=padding,
                                  output_padding=op, groups=c)

    @staticmethod
    def backward(ctx, gy):
        (weight,) = ctx.saved_tensors
        stride, padding, transpose, in_hw, has_bias = ctx.conf
        # Under autocast the forward conv may have run in bf16/fp16: follow the grad's dtype.
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _DepthwiseFIR.apply(gy, weight.to(gy.dtype), None, stride, padding,
                                     not transpose, in_hw)
        gb = gy.sum(dim=(0, 2, 3)) if has_bias and ctx.needs_input_grad[2] else None
        return gx, None, gb, None, None, None, None


def _fir(x: Tensor, f: Tensor, gain: float = 1.0, stride: int = 1, padding: int = 0,
         transpose: bool = False, bias: Tensor | None = None) -> Tensor:
    c = x.shape[1]
    w = (f * gain).to(device=x.device, dtype=x.dtype).expand(c, 1, *f.shape).contiguous()
    if transpose:  # stride-2 upsampling: output exactly stride x input
        out_hw = [stride * s for s in x.shape[2:]]
        return _DepthwiseFIR.apply(x, w, bias, stride, padding, True, out_hw)
    return _DepthwiseFIR.apply(x, w, bias, stride, padding, False, None)


def filter2d(
    x: Tensor, f: Tensor, padding: Sequence[int] = (0, 0, 0, 0), gain: float = 1.0,
    bias: Tensor | None = None,
) -> Tensor:
    """FIR-filter every channel of `x` [N,C,H,W] with `f` [k,k]; padding = (x0, x1, y0, y1).

    `f` is symmetric for all filters used here, so correlation == convolution. `bias` [C] is
    fused into the same conv.
    """
    x0, x1, y0, y1 = padding
    if not x0 == x1 == y0 == y1:
        x = F.pad(x, [x0, x1, y0, y1])
        x0 = 0
    return _fir(x, f, gain=gain, padding=x0, bias=bias)


def upsample2d(x: Tensor, f: Tensor) -> Tensor:
    """2x FIR upsampling [N,C,H,W] -> [N,C,2H,2W] (NVlabs upfirdn2d.upsample2d).

    Zero insertion + FIR is computed as a depthwise transposed conv with stride 2 and the
    filter scaled by 4 (=up^2, to keep the DC gain at 1), so no multiplies hit the zeros.
    With a k-tap filter (k even), padding (k-2)/2 gives exactly 2x the input size.
    """
    k = f.shape[-1]
    if k % 2:
        raise ValueError("upsample2d needs an even-length filter")
    return _fir(x, f, gain=4.0, stride=2, padding=(k - 2) // 2, transpose=True)


def downsample2d(x: Tensor, f: Tensor) -> Tensor:
    """2x FIR downsampling [N,C,H,W] -> [N,C,H/2,W/2] (NVlabs upfirdn2d.downsample2d).

    FIR + subsample as one stride-2 depthwise conv: only the kept pixels are computed.
    """
    k = f.shape[-1]
    if k % 2:
        raise ValueError("downsample2d needs an even-length filter")
    return _fir(x, f, stride=2, padding=(k - 2) // 2)


def conv2d_resample(
    x: Tensor,
    w: Tensor,
    f: Tensor | None = None,
    up: int = 1,
    down: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: Tensor | None = None,
) -> Tensor:
    """2-D convolution with optional 2x FIR up- or down-sampling (NVlabs conv2d_resample).

    Args:
        x: [N, groups*I, H, W] input.
        w: [groups*O, I, k, k] weight (same layout as `F.conv2d`).
        f: [kf, kf] FIR filter from `setup_filter` (needed when up or down is 2).
        up: 1 or 2; output is 2x the input size (for padding = k//2).
        down: 1 or 2; output is half the input size (for padding = k//2).
        padding: padding of the conv, expressed w.r.t. the upsampled image.
        groups: conv groups (the fused modulated conv folds the batch into groups).
        bias: optional [groups*O] bias, fused into the last conv op.

    Returns:
        [N, groups*O, H', W'].
    """
    if up not in (1, 2) or down not in (1, 2) or (up == 2 and down == 2):
        raise ValueError("supported: up in {1,2} or down in {1,2}, not both")
    out_ch, in_per_group, kh, kw = w.shape
    if up == 1 and down == 1:
        return F.conv2d(x, w, bias=bias, padding=padding, groups=groups)
    if f is None:
        raise ValueError("a FIR filter is required for resampling")
    fk = f.shape[-1]

    if down == 2:
        if kw == 1:
            # A 1x1 conv commutes with the FIR: downsample first, then convolve 4x fewer pixels.
            return F.conv2d(downsample2d(x, f), w, bias=bias, groups=groups)
        # Blur at full resolution, then a strided conv: the low-pass must precede subsampling,
        # and the strided conv only evaluates the kept output pixels.
        p = (fk - 2 + 1) // 2 + padding, (fk - 2) // 2 + padding
        x = filter2d(x, f, padding=(p[0], p[1], p[0], p[1]))
        return F.conv2d(x, w, bias=bias, stride=2, groups=groups)

    # up == 2: a stride-2 transposed conv does the zero insertion and the conv in one op (4x
    # cheaper than conv at the upsampled size); the FIR interpolation filter follows it
    # (as in NVlabs). Pads of the FIR stage, chosen so the output is exactly 2x the input:
    p0 = padding + (fk + 1) // 2 - (kw - 1)
    p1 = padding + (fk - 2) // 2 - (kw - 2)
    pt = max(min(-p0, -p1), 0)  # negative pads are taken out of the transposed conv instead
    if groups == 1:
        wt = w.transpose(0, 1)  # conv_transpose2d wants [I, O, k, k]
    else:
        wt = w.reshape(groups, out_ch // groups, in_per_group, kh, kw).transpose(1, 2)
        wt = wt.reshape(groups * in_per_group, out_ch // groups, kh, kw)
    x = F.conv_transpose2d(x, wt, stride=2, padding=pt, groups=groups)
    # Filter gain up^2 = 4 keeps the DC gain of zero insertion + FIR at 1; bias is fused here.
    return filter2d(x, f, padding=(p0 + pt, p1 + pt, p0 + pt, p1 + pt), gain=4.0, bias=bias)


# ----------------------------------------------------------------------------------------------
# Modulated convolution


def _hi(t: Tensor) -> Tensor:
    """Upcast half/bfloat16 to float32 (float64 stays float64, for gradcheck)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def modulation_coefs(
    weight: Tensor, styles: Tensor, demodulate: bool = True, gain: float = 1.0,
    eps: float = 1e-8,
) -> Tensor:
    """Per-sample scale of every (output, input) filter pair: s[n,i] * d[n,o] * gain.

    d[n,o] = rsqrt(sum_{i,k} (W[o,i,k] * s[n,i])^2 + eps) is computed as
    rsqrt(sum_i s[n,i]^2 * ||W[o,i]||^2 + eps), which never builds the [N,O,I,k,k] tensor.
    Half inputs are upcast to float32 and no autocast-listed op is used, so demodulation stays
    exact under bf16/fp16 autocast.

    Args:
        weight: [O, I, k, k]; styles: [N, I].

    Returns:
        [N, O, I], float32 (float64 for float64 inputs).
    """
    s = _hi(styles)
    coef = s.unsqueeze(1).expand(-1, weight.shape[0], -1)  # [N, O, I]
    if demodulate:
        wsq = _hi(weight).square().sum(dim=(2, 3))  # [O, I]
        d = ((s.square().unsqueeze(1) * wsq).sum(dim=2) + eps).rsqrt()  # [N, O]
        return coef * (d * gain).unsqueeze(2)
    return coef * gain if gain != 1.0 else coef


def demodulated_weight(weight: Tensor, styles: Tensor, demodulate: bool = True) -> Tensor:
    """Per-sample modulated (and demodulated) conv weights [N, O, I, k, k], at least float32.

    With `demodulate`, every output filter w[n, o] has unit L2 norm (up to eps).
    """
    coef = modulation_coefs(weight, styles, demodulate)
    return _hi(weight).unsqueeze(0) * coef[..., None, None]


def use_fused_modconv(in_channels: int, out_channels: int, kernel_size: int, in_res: int,
                      out_res: int) -> bool:
    """Pick the faster modulated-conv path for a layer from its static shapes.

    The fused path makes a few passes over the per-sample weights (N*O*I*k^2 values), the
    reference path a few over the activations (N*(I*H_in^2 + O*H_out^2) values). Low
    resolutions have big weights and small images, high resolutions the opposite.
    """
    return out_channels * in_channels * kernel_size**2 <= (in_channels * in_res**2
                                                           + out_channels * out_res**2)


def modulated_conv2d(
    x: Tensor,
    weight: Tensor,
    styles: Tensor,
    demodulate: bool = True,
    up: int = 1,
    padding: int | None = None,
    fused: bool = True,
    resample_filter: Tensor | None = None,
    gain: float = 1.0,
    bias: Tensor | None = None,
) -> Tensor:
    """StyleGAN2 modulated convolution: conv(x, weight * styles) with optional demodulation.

    Args:
        x: [N, I, H, W] input.
        weight: [O, I, k, k] weight, runtime gain already applied.
        styles: [N, I] modulation (output of the style affine).
        demodulate: normalise each per-sample output filter to unit norm.
        up: 1 or 2 (2 = transposed conv + FIR, output [N, O, 2H, 2W]).
        padding: conv padding; default k // 2.
        fused: True = fold the batch into conv groups and convolve with per-sample weights in
            one conv call (a batched matmul for 1x1 kernels); cheap when weights are small
            next to the activations. False = reference path (NVlabs `fused_modconv=False`):
            scale the activations by `styles` before and by the demodulation coefficients
            after a shared-weight conv. Both compute the same function.
        resample_filter: [kf, kf] FIR filter (required for up=2).
        gain: scalar folded into the effective weights (activation/layer gain).
        bias: optional [O] bias added after (de)modulation, before any activation.

    Returns:
        [N, O, H', W'] in x's dtype (a fresh tensor: callers may modify it in place).
    """
    n, in_ch, h, w_ = x.shape
    out_ch, _, kh, kw = weight.shape
    assert_shape(weight, [out_ch, in_ch, kh, kw], "weight")
    assert_shape(styles, [n, in_ch], "styles")
    if padding is None:
        padding = kw // 2
    dt = x.dtype
    if dt == torch.float16 and demodulate and not fused:
        # The reference path convolves in fp16 before demodulating. Demodulation is
        # scale-invariant, so normalise styles and weights (as NVlabs does) to stay in range.
        styles = styles / styles.abs().amax(dim=1, keepdim=True)
        weight = weight * (1 / math.sqrt(in_ch * kh * kw)
                           / weight.abs().amax(dim=(1, 2, 3), keepdim=True))

    if fused:
        coef = modulation_coefs(weight, styles, demodulate, gain)  # [N, O, I]
        if kh == kw == 1 and up == 1 and padding == 0:
            # 1x1: y[n] = W[n] @ x[n] over flattened pixels; bmm beats a grouped 1x1 conv.
            wm = (_hi(weight).reshape(1, out_ch, in_ch) * coef).to(dt)
            xf = x.reshape(n, in_ch, h * w_)
            if bias is None:
                y = torch.bmm(wm, xf)
            else:
                y = torch.baddbmm(bias.to(dt).reshape(1, out_ch, 1), wm, xf)
            return y.reshape(n, out_ch, h, w_)
        wm = (_hi(weight).unsqueeze(0) * coef[..., None, None]).to(dt)  # one pass
        b = bias.to(dt).repeat(n) if bias is not None else None
        y = conv2d_resample(x.reshape(1, n * in_ch, h, w_), wm.reshape(n * out_ch, in_ch, kh, kw),
                            resample_filter, up=up, padding=padding, groups=n, bias=b)
        return y.reshape(n, out_ch, *y.shape[2:])

    # Reference path: (x * s) conv W, then * (d * gain) [+ b] in one addcmul pass.
    y = conv2d_resample(x * styles.to(dt).reshape(n, in_ch, 1, 1), weight.to(dt),
                        resample_filter, up=up, padding=padding)
    if demodulate:
        wsq = _hi(weight).square().sum(dim=(2, 3))
        scale = ((_hi(styles).square().unsqueeze(1) * wsq).sum(dim=2) + 1e-8).rsqrt() * gain
        scale = scale.to(dt).reshape(n, out_ch, 1, 1)
    elif gain != 1.0:
        scale = torch.full((1, 1, 1, 1), gain, dtype=dt, device=x.device)
    else:
        scale = None
    if scale is None:
        return y + bias.to(dt).reshape(1, -1, 1, 1) if bias is not None else y
    if bias is None:
        return y * scale
    return torch.addcmul(bias.to(dt).reshape(1, -1, 1, 1), y, scale)


# ----------------------------------------------------------------------------------------------
# Equalized-learning-rate layers


class FullyConnected(nn.Module):
    """Equalized-lr linear layer: y = act(x @ (W * lr/sqrt(in)).T + b * lr) * act_gain.

    Args:
        x: [N, in_features] -> [N, out_features].
    """

    def __init__(
        self,
        in_features: int,  # input features
        out_features: int,  # output features
        bias: bool = True,  # learn an additive bias
        activation: str = "linear",  # "linear" or "lrelu"
        lr_multiplier: float = 1.0,  # learning-rate multiplier (0.01 for the mapping network)
        bias_init: float = 0.0,  # initial bias value (1 for style affines: styles start at 1)
    ) -> None:
        super().__init__()
        if activation not in ACTIVATION_GAINS:
            raise ValueError(f"unknown activation {activation!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        # Stored as N(0, 1/lr^2) so that after the runtime gain lr/sqrt(in) the effective weight
        # is N(0, 1/in) while its effective learning rate is scaled by lr.
        self.weight = nn.Parameter(torch.randn([out_features, in_features]) / lr_multiplier)
        self.bias = nn.Parameter(torch.full([out_features], float(bias_init))) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        assert_shape(x, [None, self.in_features], "FullyConnected input")
        g = ACTIVATION_GAINS[self.activation]
        w = (self.weight * (self.weight_gain * g)).to(x.dtype)
        if self.bias is None:
            x = x.matmul(w.t())
        else:
            x = torch.addmm((self.bias * (self.bias_gain * g)).to(x.dtype), x, w.t())
        if self.activation == "lrelu":
            x = F.leaky_relu(x, LRELU_SLOPE)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, activation={self.activation}"


class Conv2dLayer(nn.Module):
    """Equalized-lr conv with optional FIR up/down-sampling, bias, lrelu and clamp.

    Computes clamp(act(conv(x, W / sqrt(fan_in)) + b) * act_gain * gain, +-conv_clamp * gain),
    with all scalar gains folded into the weights and bias (see module docstring).

    Args:
        x: [N, in_channels, H, W] -> [N, out_channels, H*up/down, W*up/down].
    """

    def __init__(
        self,
        in_channels: int,  # input channels
        out_channels: int,  # output channels
        kernel_size: int,  # square kernel width (padding = kernel_size // 2)
        bias: bool = True,  # learn an additive bias
        activation: str = "linear",  # "linear" or "lrelu"
        up: int = 1,  # 2 = FIR upsample x2
        down: int = 1,  # 2 = FIR downsample x2
        resample_filter: Sequence[float] = DEFAULT_FILTER,  # 1-D taps of the FIR filter
        conv_clamp: float | None = None,  # clamp outputs to +-conv_clamp; None = off
    ) -> None:
        super().__init__()
        if activation not in ACTIVATION_GAINS:
            raise ValueError(f"unknown activation {activation!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.activation = activation
        self.up = up
        self.down = down
        self.conv_clamp = conv_clamp
        self.padding = kernel_size // 2
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.act_gain = ACTIVATION_GAINS[activation]
        self.register_buffer("resample_filter", setup_filter(resample_filter), persistent=False)
        self.weight = nn.Parameter(torch.randn([out_channels, in_channels, kernel_size,
                                                kernel_size]))
        self.bias = nn.Parameter(torch.zeros([out_channels])) if bias else None

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        assert_shape(x, [None, self.in_channels, None, None], "Conv2dLayer input")
        g = self.act_gain * gain
        w = (self.weight * (self.weight_gain * g)).to(x.dtype)
        b = (self.bias * g).to(x.dtype) if self.bias is not None else None
        x = conv2d_resample(x, w, self.resample_filter, up=self.up, down=self.down,
                            padding=self.padding, bias=b)
        clamp = self.conv_clamp * gain if self.conv_clamp is not None else None
        return act_clamp(x, self.activation, clamp)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, k={self.weight.shape[-1]}, "
                f"act={self.activation}, up={self.up}, down={self.down}, clamp={self.conv_clamp}")
