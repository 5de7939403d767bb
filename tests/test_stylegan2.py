"""Tests for the StyleGAN2 networks (cxredit.models.stylegan2) and their ops (cxredit.models.ops).

Tiny channel counts keep the whole file to a few seconds on a CPU. Where an op has a fast and
a reference path, both are compared with each other and with an independent naive version
written here.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from cxredit.models import ops
from cxredit.models import stylegan2 as sg
from cxredit.models.stylegan2 import Discriminator, Generator, MinibatchStd, num_ws_for

TINY = dict(channel_base=256, channel_max=32)
W_DIM = 32


def make_g(res: int = 16, **kw) -> Generator:
    cfg = dict(z_dim=W_DIM, w_dim=W_DIM, img_resolution=res, mapping_layers=2, **TINY)
    cfg.update(kw)
    return Generator(**cfg)


def make_d(res: int = 16, **kw) -> Discriminator:
    return Discriminator(img_resolution=res, **{**TINY, **kw})


def randomize_(module: torch.nn.Module, seed: int = 0) -> None:
    """Give zero-initialised biases and noise strengths non-zero values so they matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("noise_strength") or (name.endswith("bias") and "affine" not in name):
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


# ----------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("res", [16, 32, 64, 128, 256])
def test_generator_shapes_w_and_wplus(res):
    torch.manual_seed(0)
    G = make_g(res)
    assert G.num_ws == num_ws_for(res) == 2 * int(math.log2(res)) - 2
    z = torch.randn(2, W_DIM)
    ws = G.mapping(z)
    assert ws.shape == (2, G.num_ws, W_DIM)
    assert torch.equal(ws[:, 0], ws[:, -1])  # W broadcast
    img = G.synthesis(ws)
    assert img.shape == (2, 1, res, res) and img.dtype == torch.float32
    wplus = torch.randn(2, G.num_ws, W_DIM)  # W+: a different vector per layer
    assert G.synthesis(wplus).shape == (2, 1, res, res)
    assert G.synthesis(ws[:, 0]).shape == (2, 1, res, res)  # [N, w_dim] is broadcast
    assert G(z).shape == (2, 1, res, res)
    assert torch.isfinite(img).all()


@pytest.mark.parametrize("res", [16, 32, 64, 128, 256])
def test_discriminator_shapes(res):
    torch.manual_seed(0)
    D = make_d(res)
    out = D(torch.randn(4, 1, res, res))
    assert out.shape == (4, 1) and out.dtype == torch.float32


@pytest.mark.parametrize("res,expected", [(4, 2), (16, 6), (32, 8), (64, 10), (128, 12), (256, 14)])
def test_num_ws(res, expected):
    assert num_ws_for(res) == expected
    if res >= 16:
        assert make_g(res).synthesis.num_ws == expected


def test_num_ws_indexing_matches_nvlabs_overlap():
    """Block at res 2^k reads ws[2k-5 .. 2k-3]; its ToRGB shares an index with the next conv0."""
    G = make_g(32)
    seen = []
    for res in G.synthesis.block_resolutions:
        block = getattr(G.synthesis, f"b{res}")
        orig = block.forward

        def spy(x, img, ws, *a, _orig=orig, **k):
            seen.append(ws.detach().clone())
            return _orig(x, img, ws, *a, **k)

        block.forward = spy
    ws = torch.arange(8.0).reshape(1, 8, 1).expand(2, 8, W_DIM).contiguous()
    G.synthesis(ws)
    idx = [w[0, :, 0].long().tolist() for w in seen]
    assert idx == [[0, 1], [1, 2, 3], [3, 4, 5], [5, 6, 7]]


def test_bad_shapes_raise():
    G = make_g(16)
    with pytest.raises(ValueError, match="ws"):
        G.synthesis(torch.randn(2, G.num_ws + 1, W_DIM))
    with pytest.raises(ValueError, match="z"):
        G(torch.randn(2, W_DIM + 1))
    with pytest.raises(ValueError, match="Discriminator input"):
        make_d(16)(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="noise_mode"):
        G.synthesis(G.mapping(torch.randn(1, W_DIM)), noise_mode="bogus")
    with pytest.raises(ValueError, match="power of two"):
        make_g(48)


# ----------------------------------------------------------------------------------------------
# Modulated convolution


def test_demodulated_weight_unit_norm():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * 3
    s = torch.randn(4, 8) * 2 + 1
    wd = ops.demodulated_weight(w, s)
    assert wd.shape == (4, 16, 8, 3, 3)
    norms = wd.square().sum(dim=(2, 3, 4)).sqrt()
    torch.testing.assert_close(norms, torch.ones(4, 16), atol=1e-5, rtol=0)
    # Without demodulation it is plain modulation.
    torch.testing.assert_close(ops.demodulated_weight(w, s, demodulate=False),
                               w[None] * s[:, None, :, None, None])
    # Same direction as the modulated weight (only a positive per-filter scale differs).
    ratio = wd / (w[None] * s[:, None, :, None, None])
    assert (ratio > 0).all()


def _naive_modconv(x, weight, styles, demodulate, up, f, gain=1.0, bias=None):
    """One sample at a time, explicit weight (de)modulation, then the ordinary conv."""
    outs = []
    for n in range(x.shape[0]):
        w = weight * styles[n].reshape(1, -1, 1, 1)
        if demodulate:
            w = w / (w.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8).sqrt()
        w = w * gain
        y = ops.conv2d_resample(x[n:n + 1], w, f, up=up, padding=weight.shape[-1] // 2)
        outs.append(y if bias is None else y + bias.reshape(1, -1, 1, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("k", [1, 3])
def test_modconv_fused_matches_reference(up, demodulate, k):
    torch.manual_seed(0)
    x = torch.randn(3, 8, 8, 8)
    weight = torch.randn(6, 8, k, k) / math.sqrt(8 * k * k)
    styles = torch.randn(3, 8) * 0.5 + 1
    bias = torch.randn(6)
    f = ops.setup_filter()
    kw = dict(demodulate=demodulate, up=up, resample_filter=f, gain=1.3, bias=bias)
    fused = ops.modulated_conv2d(x, weight, styles, fused=True, **kw)
    ref = ops.modulated_conv2d(x, weight, styles, fused=False, **kw)
    naive = _naive_modconv(x, weight, styles, demodulate, up, f, gain=1.3, bias=bias)
    assert fused.shape == ref.shape == (3, 6, 8 * up, 8 * up)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=1e-5)


def test_modconv_fused_and_reference_gradients_agree():
    torch.manual_seed(0)
    f = ops.setup_filter()
    grads = []
    for fused in (True, False):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(2, 4, 6, 6, generator=g, requires_grad=True)
        w = torch.randn(5, 4, 3, 3, generator=g, requires_grad=True)
        s = torch.randn(2, 4, generator=g, requires_grad=True)
        y = ops.modulated_conv2d(x, w, s, up=2, resample_filter=f, fused=fused)
        (y * torch.randn(y.shape, generator=g)).sum().backward()
        grads.append([x.grad, w.grad, s.grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_modconv_double_backward_gradcheck():
    g = torch.Generator().manual_seed(0)
    f = ops.setup_filter().double()
    x = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    for fused in (True, False):
        def fn(x, w, s, fused=fused):
            return ops.modulated_conv2d(x, w, s, up=2, resample_filter=f, fused=fused)

        assert torch.autograd.gradcheck(fn, (x, w, s), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x, w, s), fast_mode=True)


def test_whole_generator_same_output_for_every_modconv_path():
    torch.manual_seed(0)
    G = make_g(32)
    randomize_(G)
    ws = torch.randn(3, G.num_ws, W_DIM)
    auto = G.synthesis(ws, noise_mode="const")
    layers = [m for m in G.modules() if isinstance(m, sg.SynthesisLayer)]
    assert {m.fused for m in layers} == {True, False}  # this config exercises both paths
    for forced in (True, False):
        out = G.synthesis(ws, noise_mode="const", fused_modconv=forced)
        torch.testing.assert_close(out, auto, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# FIR resampling


def _naive_upfirdn(x, f, up=1, down=1, pad=(0, 0, 0, 0), gain=1.0):
    """Textbook upfirdn: zero insertion, zero padding, 2-D FIR (true convolution), decimation."""
    n, c, h, w = x.shape
    if up > 1:
        u = x.new_zeros(n, c, h * up, w * up)
        u[:, :, ::up, ::up] = x
        x = u
    x = F.pad(x, list(pad))
    k = (f * gain).flip([0, 1]).expand(c, 1, *f.shape)
    return F.conv2d(x, k, groups=c)[:, :, ::down, ::down]


def test_fir_matches_naive_upfirdn():
    torch.manual_seed(0)
    f = ops.setup_filter()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ops.upsample2d(x, f),
                               _naive_upfirdn(x, f, up=2, pad=(2, 1, 2, 1), gain=4.0))
    torch.testing.assert_close(ops.downsample2d(x, f),
                               _naive_upfirdn(x, f, down=2, pad=(1, 1, 1, 1)))


def test_fir_preserves_constant_image():
    f = ops.setup_filter()
    x = torch.full((1, 2, 16, 16), 0.7)
    up = ops.upsample2d(x, f)
    down = ops.downsample2d(x, f)
    assert up.shape == (1, 2, 32, 32) and down.shape == (1, 2, 8, 8)
    torch.testing.assert_close(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 0.7))
    torch.testing.assert_close(down[..., 1:-1, 1:-1],
                               torch.full_like(down[..., 1:-1, 1:-1], 0.7))


def test_fir_up_then_down_is_near_identity_on_smooth_images():
    f = ops.setup_filter()
    t = torch.arange(32.0)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    x = (torch.sin(2 * math.pi * xx / 32) * torch.cos(2 * math.pi * yy / 32))[None, None]
    back = ops.downsample2d(ops.upsample2d(x, f), f)
    assert back.shape == x.shape
    # A misaligned (shifted) filter pair would leave ~0.1 error at this frequency.
    assert (back - x)[..., 3:-3, 3:-3].abs().max() < 0.02


def test_conv2d_resample_up_is_upsample_then_convolution():
    """Fast path (transposed conv + FIR) == FIR upsample then true convolution (interior)."""
    torch.manual_seed(0)
    f = ops.setup_filter()
    x = torch.randn(1, 2, 8, 8)
    w = torch.randn(3, 2, 3, 3)
    fast = ops.conv2d_resample(x, w, f, up=2, padding=1)
    slow = F.conv2d(ops.upsample2d(x, f), w.flip([2, 3]), padding=1)
    torch.testing.assert_close(fast[..., 3:-3, 3:-3], slow[..., 3:-3, 3:-3], atol=1e-5, rtol=0)


def test_conv2d_resample_down_is_filter_then_subsample():
    torch.manual_seed(0)
    f = ops.setup_filter()
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 3, 3)
    out = ops.conv2d_resample(x, w, f, down=2, padding=1)
    ref = F.conv2d(_naive_upfirdn(x, f, pad=(2, 2, 2, 2)), w)[:, :, ::2, ::2]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    w1 = torch.randn(4, 3, 1, 1)
    torch.testing.assert_close(ops.conv2d_resample(x, w1, f, down=2),
                               F.conv2d(ops.downsample2d(x, f), w1))


def test_fir_gradients_of_first_and_second_order():
    f = ops.setup_filter().double()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    fns = [lambda x: ops.upsample2d(x, f), lambda x: ops.downsample2d(x, f),
           lambda x: ops.filter2d(x, f, padding=(1, 1, 1, 1), gain=4.0, bias=b),
           lambda x: ops.filter2d(x, f, padding=(2, 1, 2, 1))]
    for fn in fns:
        assert torch.autograd.gradcheck(fn, (x,), fast_mode=True)
        assert torch.autograd.gradgradcheck(fn, (x,), fast_mode=True)


# ----------------------------------------------------------------------------------------------
# Layers: equalized learning rate, bias/act folding


def test_equalized_lr_fully_connected_statistics():
    torch.manual_seed(0)
    x = torch.randn(4096, 256)
    for lr in (1.0, 0.01):
        fc = ops.FullyConnected(256, 256, lr_multiplier=lr)
        # Stored weights ~ N(0, 1/lr^2): the runtime gain lr/sqrt(fan_in) does the scaling.
        assert abs(fc.weight.std().item() * lr - 1) < 0.02
        assert abs(fc.weight_gain - lr / 16) < 1e-12
        with torch.no_grad():
            assert abs(fc(x).var().item() - 1) < 0.05
    fc = ops.FullyConnected(256, 256, activation="lrelu")
    with torch.no_grad():  # sqrt(2) gain: E[y^2] = 2 * (1 + 0.2^2) / 2
        assert abs(fc(x).square().mean().item() - 1.04) < 0.06
    assert torch.equal(ops.FullyConnected(4, 5, bias_init=1).bias, torch.ones(5))


def test_equalized_lr_conv_statistics():
    torch.manual_seed(0)
    conv = ops.Conv2dLayer(64, 64, 3)
    assert abs(conv.weight.std().item() - 1) < 0.03
    x = torch.randn(8, 64, 32, 32)
    with torch.no_grad():
        y = conv(x)[..., 1:-1, 1:-1]  # interior: full fan-in
    assert abs(y.var().item() - 1) < 0.05


@pytest.mark.parametrize("down", [1, 2])
@pytest.mark.parametrize("gain", [1.0, math.sqrt(0.5)])
def test_conv_layer_matches_bias_act_reference(down, gain):
    """Gains folded into weights == NVlabs order: conv, + bias, lrelu, * gain, clamp."""
    torch.manual_seed(0)
    conv = ops.Conv2dLayer(4, 6, 3, activation="lrelu", down=down, conv_clamp=0.5)
    randomize_(conv)
    x = torch.randn(2, 4, 8, 8)
    y = ops.conv2d_resample(x, conv.weight * conv.weight_gain, conv.resample_filter, down=down,
                            padding=1)
    ref = ops.bias_act(y, conv.bias, act="lrelu", gain=ops.LRELU_GAIN * gain, clamp=0.5 * gain)
    out = conv(x, gain=gain)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert out.abs().max() <= 0.5 * gain + 1e-6 and (out.abs() > 0.5 * gain - 1e-6).any()


def test_synthesis_layer_and_torgb_match_reference_formula():
    """NVlabs order: modconv, + noise * strength, + bias, lrelu, * sqrt(2), clamp."""
    torch.manual_seed(0)
    G = make_g(16, conv_clamp=0.8)
    randomize_(G)
    layer, torgb = G.synthesis.b16.conv0, G.synthesis.b16.torgb
    x = torch.randn(2, layer.in_channels, 8, 8)
    w = torch.randn(2, W_DIM)
    noise = layer.noise_const * layer.noise_strength
    y = _naive_modconv(x, layer.weight, layer.affine(w), True, 2, ops.setup_filter()) + noise
    ref = ops.bias_act(y, layer.bias, act="lrelu", gain=ops.LRELU_GAIN, clamp=0.8)
    torch.testing.assert_close(layer(x, w, noise_mode="const"), ref, atol=1e-5, rtol=1e-5)
    h = torch.randn(2, torgb.weight.shape[1], 16, 16)
    s = torgb.affine(w) / math.sqrt(h.shape[1])
    ref = ops.bias_act(_naive_modconv(h, torgb.weight, s, False, 1, None), torgb.bias, clamp=0.8)
    torch.testing.assert_close(torgb(h, w), ref, atol=1e-5, rtol=1e-5)


def test_discriminator_block_matches_reference_formula():
    """out = (skip(x) + conv1(conv0(x))) * sqrt(1/2), clamp scaled with the gain."""
    torch.manual_seed(0)
    D = make_d(16, conv_clamp=0.7)
    randomize_(D)
    blk = D.b8
    x = torch.randn(2, blk.conv0.in_channels, 8, 8)
    f = ops.setup_filter()

    def ref_conv(layer, x, gain=1.0):
        y = ops.conv2d_resample(x, layer.weight * layer.weight_gain, f, down=layer.down,
                                padding=layer.padding)
        clamp = layer.conv_clamp * gain if layer.conv_clamp is not None else None
        return ops.bias_act(y, layer.bias, act=layer.activation,
                            gain=ops.ACTIVATION_GAINS[layer.activation] * gain, clamp=clamp)

    g = math.sqrt(0.5)
    ref = ref_conv(blk.skip, x, g) + ref_conv(blk.conv1, ref_conv(blk.conv0, x), g)
    torch.testing.assert_close(blk(x), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Mapping network, noise, features


def test_truncation_and_w_avg():
    torch.manual_seed(0)
    G = make_g(16)
    M = G.mapping
    M.w_avg.copy_(torch.randn(W_DIM))
    z = torch.randn(5, W_DIM)
    torch.testing.assert_close(M(z, psi=0.0), M.w_avg.expand(5, G.num_ws, W_DIM))
    ws, half = M(z), M(z, psi=0.5)
    torch.testing.assert_close(half, M.w_avg + 0.5 * (ws - M.w_avg))
    cut = M(z, psi=0.0, cutoff=2)
    torch.testing.assert_close(cut[:, :2], M.w_avg.expand(5, 2, W_DIM))
    torch.testing.assert_close(cut[:, 2:], ws[:, 2:])
    assert M(z, broadcast=False).shape == (5, W_DIM)
    # psi=0 through the whole generator gives the image of w_avg.
    img = G(z, psi=0.0, noise_mode="const")
    torch.testing.assert_close(img, img[:1].expand_as(img))


def test_w_avg_update_only_when_asked():
    torch.manual_seed(0)
    M = make_g(16).mapping
    z = torch.randn(16, W_DIM)
    M(z)
    assert torch.equal(M.w_avg, torch.zeros(W_DIM))
    w = M(z, broadcast=False)
    M(z, update_emas=True)
    torch.testing.assert_close(M.w_avg, (1 - M.w_avg_beta) * w.mean(0))


def test_mapping_normalizes_z_scale():
    M = make_g(16).mapping
    z = torch.randn(3, W_DIM)
    torch.testing.assert_close(M(z), M(z * 7.5))


def test_noise_modes():
    G = make_g(16)
    randomize_(G)
    ws = G.mapping(torch.randn(2, W_DIM))
    const1 = G.synthesis(ws, noise_mode="const")
    assert torch.equal(const1, G.synthesis(ws, noise_mode="const"))
    r1, r2 = G.synthesis(ws), G.synthesis(ws)
    assert not torch.allclose(r1, r2)
    none = G.synthesis(ws, noise_mode="none")
    assert not torch.allclose(none, r1) and not torch.allclose(none, const1)
    g1 = G.synthesis(ws, generator=torch.Generator().manual_seed(3))
    g2 = G.synthesis(ws, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g1, g2)
    # With zero noise strength (the init) every mode gives the same image.
    G0 = make_g(16)
    ws0 = G0.mapping(torch.randn(2, W_DIM))
    torch.testing.assert_close(G0.synthesis(ws0), G0.synthesis(ws0, noise_mode="none"))


def test_noise_const_is_reproducible_from_seed():
    a, b, c = make_g(16), make_g(16), make_g(16, noise_seed=1)
    assert torch.equal(a.synthesis.b16.conv1.noise_const, b.synthesis.b16.conv1.noise_const)
    assert not torch.equal(a.synthesis.b16.conv1.noise_const, c.synthesis.b16.conv1.noise_const)
    assert "synthesis.b8.conv0.noise_const" in a.state_dict()


def test_return_features():
    torch.manual_seed(0)
    G = make_g(32)
    randomize_(G)
    ws = torch.randn(2, G.num_ws, W_DIM)
    img, feats = G.synthesis(ws, noise_mode="const", return_features=True)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 4, 4), (2, 32, 8, 8), (2, 16, 16, 16),
                                                (2, 8, 32, 32)]
    torch.testing.assert_close(img, G.synthesis(ws, noise_mode="const"))
    # Features are part of the graph (usable in a content loss).
    feats[1].square().mean().backward()
    assert G.synthesis.b8.conv1.weight.grad is not None


# ----------------------------------------------------------------------------------------------
# Config round trip, minibatch std, gradients


def test_config_round_trip_reproduces_outputs():
    torch.manual_seed(0)
    G = make_g(32, conv_clamp=None, noise_seed=5)
    D = make_d(32, mbstd_group_size=2)
    randomize_(G)
    randomize_(D)
    G2 = Generator(**json.loads(json.dumps(G.config)))
    D2 = Discriminator(**json.loads(json.dumps(D.config)))
    G2.load_state_dict(G.state_dict())
    D2.load_state_dict(D.state_dict())
    z = torch.randn(4, W_DIM)
    img = G(z, noise_mode="const")
    torch.testing.assert_close(G2(z, noise_mode="const"), img)
    torch.testing.assert_close(D2(img), D(img))
    assert G2.config == G.config and D2.config == D.config
    assert (G.z_dim, G.w_dim, G.img_resolution, G.num_ws) == (W_DIM, W_DIM, 32, 8)


def _naive_mbstd(x, group):
    n = x.shape[0]
    groups = n // group
    stds = torch.empty(n)
    for j in range(groups):
        members = x[j::groups]  # NVlabs layout: samples j, j + n/G, j + 2n/G, ...
        s = members.var(dim=0, unbiased=False).add(1e-8).sqrt().mean()
        stds[j::groups] = s
    return stds


@pytest.mark.parametrize("n,group", [(8, 4), (8, 2), (3, 4), (4, 1)])
def test_minibatch_std(n, group):
    torch.manual_seed(0)
    x = torch.randn(n, 5, 4, 4) * torch.arange(1, n + 1).reshape(n, 1, 1, 1)
    y = MinibatchStd(group_size=group)(x)
    assert y.shape == (n, 6, 4, 4)
    assert torch.equal(y[:, :5], x)
    g = min(group, n)
    expected = _naive_mbstd(x, g).reshape(n, 1, 1, 1).expand(n, 1, 4, 4)
    torch.testing.assert_close(y[:, 5:], expected, atol=1e-4, rtol=1e-5)


def test_minibatch_std_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="divisible"):
        MinibatchStd(group_size=4)(torch.randn(6, 2, 4, 4))


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    G, D = make_g(32), make_d(32)
    img = G(torch.randn(4, W_DIM))  # random noise: noise_strength (0 at init) still gets grads
    D(img).sum().backward()
    for name, p in list(G.named_parameters()) + list(D.named_parameters()):
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_double_backward_for_r1_and_path_length():
    torch.manual_seed(0)
    G, D = make_g(16), make_d(16)
    real = torch.randn(4, 1, 16, 16, requires_grad=True)
    (r1,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
    r1.square().sum().backward()
    # Everything but the output bias (which does not affect d D / d x) gets a gradient.
    missing = [n for n, p in D.named_parameters() if p.grad is None]
    assert missing == ["b4.out.bias"]
    ws = G.mapping(torch.randn(2, W_DIM))
    img = G.synthesis(ws)
    (pl,) = torch.autograd.grad((img * torch.randn_like(img)).sum(), ws, create_graph=True)
    pl.square().sum().backward()
    assert G.synthesis.b16.conv1.weight.grad is not None


def test_fp16_blocks_run_when_enabled(monkeypatch):
    """num_fp16_res only engages on CUDA; force it here to check the dtype plumbing."""
    torch.manual_seed(0)
    G, D = make_g(32, num_fp16_res=2), make_d(32, num_fp16_res=2)
    ws = torch.randn(2, G.num_ws, W_DIM)
    ref = G.synthesis(ws, noise_mode="const")
    monkeypatch.setattr(sg, "_fp16_device", lambda device: True)
    img, feats = G.synthesis(ws, noise_mode="const", return_features=True)
    assert [f.dtype for f in feats] == [torch.float32] * 2 + [torch.float16] * 2
    assert img.dtype == torch.float32 and D(img).dtype == torch.float32
    assert (img - ref).abs().max() < 0.05 * ref.abs().max()
    ref_path = G.synthesis(ws, noise_mode="const", fused_modconv=False)  # fp16 reference path
    assert (ref_path - ref).abs().max() < 0.05 * ref.abs().max()


def test_bf16_autocast_keeps_image_and_logits_float32():
    torch.manual_seed(0)
    G, D = make_g(16), make_d(16)
    z = torch.randn(2, W_DIM)
    ref = G(z, noise_mode="const")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        img = G(z, noise_mode="const")
        logits = D(img)
    assert img.dtype == torch.float32 and logits.dtype == torch.float32
    assert (img - ref).abs().max() < 0.05 * ref.abs().max()
    logits.sum().backward()
