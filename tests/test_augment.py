"""Tests for cxredit.train.augment: ADA pipeline semantics and the p controller."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cxredit.train.augment import AdaController, AugmentPipe, _blit, _resample

OPS = ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")
OPS += ("brightness", "contrast", "lumaflip", "noise", "cutout")


def only(p: float = 1.0, **kwargs: float) -> AugmentPipe:
    """A pipe with every op off except those given (multiplier 1 unless stated)."""
    cfg = {op: 0.0 for op in OPS}
    cfg.update(kwargs)
    pipe = AugmentPipe(**cfg)
    pipe.p.fill_(p)
    return pipe


def everything(p: float = 1.0, **kwargs: float) -> AugmentPipe:
    return only(p, **{op: 1.0 for op in OPS}, **kwargs)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def asymmetric(n: int = 8, h: int = 16, w: int = 16) -> torch.Tensor:
    """[n,1,h,w] with no mirror or rotation symmetry: every transform changes it."""
    return torch.rand(n, 1, h, w, generator=gen(123)) * 2 - 1


def test_p_zero_returns_input_unchanged() -> None:
    x = asymmetric()
    g = gen()
    state = g.get_state()
    out = everything(p=0.0)(x, g)
    assert out is x and torch.equal(out, asymmetric())
    assert torch.equal(g.get_state(), state)  # the generator is not consumed either


def test_no_op_fired_returns_input_without_resampling() -> None:
    x = asymmetric()
    assert everything(p=1e-12)(x, gen()) is x


def test_xflip_gives_exact_flips() -> None:
    # ADA semantics: at p=1 the op always fires and then picks "flip" or "no flip" 50/50.
    x = asymmetric(n=1).expand(64, -1, -1, -1)
    out = only(xflip=1)(x, gen())
    flipped = torch.tensor([torch.equal(o, torch.flip(x[0], dims=[-1])) for o in out])
    kept = torch.tensor([torch.equal(o, x[0]) for o in out])
    assert bool((flipped | kept).all())
    assert 10 < int(flipped.sum()) < 54


def test_integer_translation_moves_a_known_pattern() -> None:
    x = torch.full((16, 1, 32, 32), -1.0)
    x[:, :, 12, 19] = 1.0
    out = only(xint=1, xint_max=0.125)(x, gen(3))
    moved = 0
    for o in out:
        ys, xs = torch.nonzero(o[0] == 1.0, as_tuple=True)
        assert len(ys) == 1 and int((o == -1.0).sum()) == 32 * 32 - 1
        dy, dx = int(ys[0]) - 12, int(xs[0]) - 19
        assert abs(dy) <= 4 and abs(dx) <= 4  # round(0.125 * 32)
        assert torch.equal(o, torch.roll(x[0], shifts=(dy, dx), dims=(1, 2)))
        moved += (dy, dx) != (0, 0)
    assert moved >= 12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1, 16, 16), (5, 1, 24, 32)])
def test_shape_dtype_device_preserved(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.rand(shape, dtype=dtype) * 2 - 1
    out = everything()(x, gen())
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_generator_drives_cuda_images() -> None:
    x = asymmetric().cuda()
    a, b = everything(p=0.5).cuda()(x, gen(4)), everything(p=0.5)(x.cpu(), gen(4))
    assert a.device == x.device
    torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)


def test_rejects_multichannel_images() -> None:
    with pytest.raises(ValueError, match=r"\[N,1,H,W\]"):
        everything()(torch.zeros(2, 3, 8, 8), gen())


def test_generator_drives_all_randomness() -> None:
    x = asymmetric()
    pipe = everything(p=0.5)
    global_state = torch.get_rng_state()
    a, b, c = pipe(x, gen(7)), pipe(x, gen(7)), pipe(x, gen(8))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_gradients_flow_to_the_input() -> None:
    x = asymmetric().requires_grad_()
    weights = torch.rand(x.shape, generator=gen(1))
    (everything()(x, gen()) * weights).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("p", [0.5, 1.0])
def test_gradcheck(p: float) -> None:
    # The pipe is affine in the images for fixed random draws: check the full Jacobian,
    # including mixed batches (identity / blit / resample samples side by side).
    x = torch.rand(3, 1, 6, 6, dtype=torch.float64).requires_grad_()
    pipe = everything(p=p)
    assert torch.autograd.gradcheck(lambda t: pipe(t, gen(5)), (x,), fast_mode=True)


def test_brightness_contrast_is_affine_per_sample() -> None:
    x = asymmetric(n=16)
    out = only(brightness=1, contrast=1)(x, gen())
    changed = 0
    for xi, oi in zip(x.flatten(1), out.flatten(1)):
        a = (oi[1] - oi[0]) / (xi[1] - xi[0])
        b = oi[0] - a * xi[0]
        torch.testing.assert_close(oi, a * xi + b)
        assert a > 0  # no luma flip
        changed += not torch.allclose(oi, xi)
    assert changed == 16


def test_lumaflip_negates() -> None:
    x = asymmetric(n=32)
    out = only(lumaflip=1)(x, gen())
    neg = torch.tensor([torch.equal(o, -xi) for o, xi in zip(out, x)])
    same = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert bool((neg | same).all()) and 0 < int(neg.sum()) < 32


def test_geometry_uses_reflection_so_a_constant_image_stays_constant() -> None:
    # Zero (or any non-reflecting) padding would show a border in scaled/rotated images.
    x = torch.full((16, 1, 20, 20), 0.3)
    out = only(xflip=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, scale_std=1.0)(x, gen())
    torch.testing.assert_close(out, x)


def test_rotation_averages_a_square_into_a_disc() -> None:
    r, size = 6, 33
    x = -torch.ones(1, 1, size, size)
    x[..., 16 - r : 16 + r + 1, 16 - r : 16 + r + 1] = 1.0
    mean = only(rotate=1)(x.expand(256, -1, -1, -1), gen()).mean(dim=0)[0]
    # Radius ~8 px: inside the square's corner on the diagonal, outside it on the axes.
    axis = torch.stack([mean[16, 24], mean[16, 8], mean[24, 16], mean[8, 16]])
    diag = torch.stack([mean[22, 22], mean[10, 10], mean[22, 10], mean[10, 22]])
    assert x[0, 0, 22, 22] - x[0, 0, 16, 24] == 2.0
    assert (diag.mean() - axis.mean()).abs() < 0.25
    assert (axis - axis.mean()).abs().max() < 0.25  # the four axis points agree
    torch.testing.assert_close(mean.sum(), x.sum(), rtol=0.05, atol=0.0)  # area kept


@pytest.mark.parametrize(
    "mat",
    [
        [[-1.0, 0, 0], [0, 1, 0], [0, 0, 1]],
        [[0.0, -1, 0], [1, 0, 0], [0, 0, 1]],
        [[1.0, 0, 3], [0, 1, -21], [0, 0, 1]],  # beyond the border: reflection, twice
    ],
)
def test_blit_and_resample_agree_on_integer_transforms(mat: list[list[float]]) -> None:
    x = asymmetric(n=2)
    m = torch.tensor(mat).expand(2, 3, 3)
    torch.testing.assert_close(_resample(x, m, supersample=1), _blit(x, m))


def test_resample_matches_affine_grid_reference() -> None:
    # The hand-built grid must equal F.affine_grid's; non-square, 2x supersampled.
    x = asymmetric(n=4, h=16, w=12)
    m = torch.eye(3) + 0.1 * torch.randn(4, 3, 3, generator=gen(9))
    m[:, 2] = torch.tensor([0.0, 0.0, 1.0])
    half = torch.tensor([6.0, 8.0, 1.0])
    theta = (m * half[None, None, :]) / half[None, :, None]
    grid = torch.nn.functional.affine_grid(theta[:, :2], [4, 1, 32, 24], align_corners=False)
    ref = torch.nn.functional.grid_sample(x, grid, padding_mode="reflection", align_corners=False)
    ref = torch.nn.functional.avg_pool2d(ref, 2)
    torch.testing.assert_close(_resample(x, m, supersample=2), ref)


def test_blit_matches_torch_rot90() -> None:
    x = asymmetric(n=1)
    m = torch.tensor([[[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]])
    assert any(torch.equal(_blit(x, m), torch.rot90(x, k, dims=(2, 3))) for k in (1, 3))


def test_cutout_and_noise() -> None:
    x = asymmetric(n=8, h=32, w=32)
    out = only(cutout=1, cutout_size=0.5)(x, gen())
    zeroed = (out == 0) & (x != 0)
    assert torch.equal(out[~zeroed], x[~zeroed])
    frac = zeroed.flatten(1).float().mean(dim=1)
    assert bool(((frac > 0.05) & (frac <= 0.25 + 1e-6)).all())
    noisy = only(noise=1, noise_std=0.1)(x, gen()) - x
    assert 0 < noisy.std() < 0.5


def test_config_rebuilds_the_same_pipe() -> None:
    pipe = AugmentPipe(rotate90=1, scale_std=0.3)
    pipe.p.fill_(0.4)
    clone = AugmentPipe(**json.loads(json.dumps(pipe.config)))
    clone.load_state_dict(pipe.state_dict())
    assert clone.config == pipe.config and float(clone.p) == pytest.approx(0.4)
    x = asymmetric()
    assert torch.equal(clone(x, gen(2)), pipe(x, gen(2)))


def run_controller(ctrl: AdaController, pipe: AugmentPipe, logits: list[float]) -> list[float]:
    ps = []
    for value in logits:
        ctrl.accumulate(torch.full((8, 1), value))
        ctrl.maybe_update(pipe)
        ps.append(float(pipe.p))
    return ps


def test_controller_raises_p_when_d_overfits_and_lowers_it_otherwise() -> None:
    pipe = only(p=0.0)
    ctrl = AdaController(batch_size=64, interval=4, kimg=1.0)  # step 64*4/1000 = 0.256
    for _ in range(3):
        ctrl.accumulate(torch.ones(64))
        assert ctrl.maybe_update(pipe) is None
    ctrl.accumulate(torch.ones(64))
    assert ctrl.maybe_update(pipe) == pytest.approx(0.256)
    assert ctrl.last_rt == 1.0
    ps = run_controller(ctrl, pipe, [3.0] * 40)
    assert ps[-1] == 1.0 and max(ps) == 1.0  # clamped
    ps = run_controller(ctrl, pipe, [-2.0] * 16)
    assert ps[3] == pytest.approx(1 - 0.256) and ps[7] == pytest.approx(1 - 0.512)
    ps = run_controller(ctrl, pipe, [-2.0] * 40)
    assert ps[-1] == 0.0 and min(ps) == 0.0


def test_controller_uses_the_sign_rate_against_the_target() -> None:
    pipe = only(p=0.5)
    ctrl = AdaController(batch_size=10, interval=1, kimg=1.0, target=0.6)
    ctrl.accumulate(torch.tensor([1.0, 1.0, 1.0, -1.0, 0.5]))  # r_t = 0.6: hold
    assert ctrl.maybe_update(pipe) == pytest.approx(0.5)
    ctrl.accumulate(torch.tensor([1.0, 1.0, -1.0, -1.0, 0.5]))  # r_t = 0.2: lower
    assert ctrl.maybe_update(pipe) == pytest.approx(0.49)


def test_controller_state_dict_resumes_exactly() -> None:
    logits = [math.sin(i / 7) + 0.3 for i in range(60)]  # p rises, falls, rises
    pipe_a, ctrl_a = only(p=0.0), AdaController(batch_size=32, interval=4, kimg=2.0)
    run_controller(ctrl_a, pipe_a, logits[:22])  # stop mid-interval
    state = json.loads(json.dumps(ctrl_a.state_dict()))
    pipe_b, ctrl_b = only(p=float(pipe_a.p)), AdaController(batch_size=32, interval=4, kimg=2.0)
    ctrl_b.load_state_dict(state)
    rest_a = run_controller(ctrl_a, pipe_a, logits[22:])
    rest_b = run_controller(ctrl_b, pipe_b, logits[22:])
    assert rest_a == rest_b and len(set(rest_a)) > 3


def test_controller_under_single_process_gloo(tmp_path) -> None:
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        pipe, ctrl = only(p=0.0), AdaController(batch_size=250, interval=1, kimg=1.0)
        ctrl.accumulate(torch.ones(4))
        assert ctrl.maybe_update(pipe) == pytest.approx(0.25)
    finally:
        dist.destroy_process_group()


def test_controller_validates_arguments() -> None:
    with pytest.raises(ValueError):
        AdaController(batch_size=0)
