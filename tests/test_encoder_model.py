"""Tests for the two-branch encoder (cxredit.models.encoder).

Tiny widths (tiny trunk of width 8, 8-channel detail branch) keep most tests to milliseconds;
the torchvision ResNet-18/50/101 trunks are built a few times, and ResNet-101 runs once.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from cxredit import config as gan_config
from cxredit.models.encoder import (
    ENCODER_PRESETS,
    Encoder,
    EncoderConfig,
    encoder_config_for,
)
from cxredit.models.stylegan2 import Generator, num_ws_for


@pytest.fixture(autouse=True)
def _one_thread():
    # These ops are tiny: on the shared 2-core machine a second intra-op thread mostly waits
    # for a descheduled peer (measured: 14 s for this file with 1 thread vs 66 s with 2 under
    # load), so run single-threaded and restore the setting for the other test files.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SMALL = dict(w_dim=16, tiny_width=8, detail_channels=8, spade_hidden=8, head_hidden=32)


def make(resolution: int = 32, trunk: str = "tiny", space: str = "w", **kw) -> Encoder:
    torch.manual_seed(kw.pop("seed", 0))
    return Encoder(resolution=resolution, trunk=trunk, space=space, **{**SMALL, **kw})


def images(n: int, res: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, res, res, generator=gen) * 2 - 1


# ----------------------------------------------------------------------------------------------
# Shapes


@pytest.mark.parametrize("res,trunk,space", [
    (32, "tiny", "w"), (32, "tiny", "w+"), (64, "tiny", "w"), (64, "tiny", "w+"),
    (128, "tiny", "w+"), (32, "resnet18", "w+"), (64, "resnet18", "w"),
])
def test_output_and_feature_shapes(res, trunk, space):
    E = make(res, trunk, space)
    x = images(2, res)
    w, feats = E(x, return_features=True)
    want = [2, 16] if space == "w" else [2, num_ws_for(res), 16]
    assert list(w.shape) == want and w.dtype == torch.float32 and torch.isfinite(w).all()
    assert len(feats) == len(E.feature_names) == 5 + E.config["detail_stages"]
    assert all(f.ndim == 4 and f.shape[0] == 2 and torch.isfinite(f).all() for f in feats)
    assert torch.equal(E(x), w)  # return_features does not change the result (train-mode BN)
    # the map the detail branch modulates is at least 2x2, and no map is smaller than 2x2
    assert min(f.shape[-1] for f in feats) >= 2


def test_big_trunks_build_and_paper128_runs():
    E = Encoder(encoder_config_for("paper128", space="w+")).eval()
    assert E.config["trunk"] == "resnet101" and E.config["stem"] == "imagenet"
    with torch.no_grad():
        w = E(images(1, 128))
    assert list(w.shape) == [1, 12, 512]
    E50 = Encoder(resolution=64, trunk="resnet50", w_dim=32)
    assert E50.trunk.layer4[-1].conv3.out_channels == 2048
    assert E50.trunk.conv1.weight.shape == (64, 1, 3, 3)  # small stem at 64 px


def test_stems():
    assert make(64).trunk.conv1.stride == (1, 1)  # auto at <= 64 px: 3x3/1, no max-pool
    assert isinstance(make(64).trunk.maxpool, torch.nn.Identity)
    E = make(128)  # auto at 128 px: ImageNet stem
    assert E.trunk.conv1.kernel_size == (7, 7) and E.trunk.conv1.stride == (2, 2)
    assert isinstance(E.trunk.maxpool, torch.nn.MaxPool2d)
    E = make(64, stem="strided")
    _, feats = E(images(2, 64), return_features=True)
    assert feats[0].shape[-1] == 32 and feats[4].shape[-1] == 4


def test_invalid_inputs_and_configs():
    E = make(32)
    for bad in (images(2, 64), torch.zeros(2, 3, 32, 32), torch.zeros(1, 32, 32),
                torch.zeros(2, 1, 32, 16)):
        with pytest.raises(ValueError, match=r"Encoder expects images \[N,1,32,32\]"):
            E(bad)
    for kw in (dict(trunk="resnet152"), dict(space="z"), dict(resolution=48),
               dict(stem="imagenet"), dict(merge_layer="layer2"), dict(detail_stages=6),
               dict(num_ws=0)):
        with pytest.raises(ValueError):
            Encoder(**{**SMALL, "resolution": 32, "trunk": "tiny", **kw})
    with pytest.raises(ValueError, match="unknown EncoderConfig field"):
        Encoder(resolution=32, trunk="tiny", widht=3)
    with pytest.raises(ValueError, match="w_avg"):
        E.set_w_avg(torch.zeros(17))


# ----------------------------------------------------------------------------------------------
# Behaviour


@pytest.mark.parametrize("space", ["w", "w+"])
def test_starts_near_w_avg(space):
    w_avg = torch.randn(16, generator=torch.Generator().manual_seed(1)) * 2
    E = make(32, space=space, w_avg=w_avg).eval()
    w = E(images(4, 32))
    offset = w - w_avg
    assert offset.abs().max() < 0.05 * w_avg.abs().max()  # E(x) ~ w_avg at init ...
    assert offset.abs().max() > 0  # ... but not exactly: the head is small, not zero
    E.set_w_avg(w_avg + 1)
    torch.testing.assert_close(E(images(4, 32)), w + 1)


def test_detail_branch_changes_the_output():
    E = make(32).eval()
    ramp = torch.linspace(-1, 1, 32).expand(32, 32)  # a smooth image vs. a noisy one
    x = torch.stack([images(1, 32)[0], ramp[None]])
    with torch.no_grad():
        ref = E(x) - E.w_avg
        handle = E.detail.register_forward_hook(lambda m, i, out: [torch.zeros_like(o)
                                                                   for o in out])
        zeroed = E(x) - E.w_avg
        handle.remove()
        # image 0 with the detail features of image 1: the merge is per-sample and spatial
        swap = E.detail.register_forward_hook(lambda m, i, out: [o.flip(0) for o in out])
        swapped = E(x) - E.w_avg
        swap.remove()
        torch.testing.assert_close(E(x) - E.w_avg, ref)  # hooks gone, same output again
    scale = ref.abs().max()  # without the detail path these differences would be exactly 0
    assert (zeroed - ref).abs().max() > 0.05 * scale
    assert (swapped - ref).abs().max() > 0.01 * scale
    with torch.no_grad():
        E.merge.gamma.weight.add_(0.5)
        assert (E(x) - E.w_avg - ref).abs().max() > 0.05 * scale


def test_gradients_reach_both_branches_and_training_fits():
    E = make(32, space="w+").train()
    x = images(4, 32)
    target = torch.randn(4, E.num_ws, 16, generator=torch.Generator().manual_seed(3))
    loss0 = (E(x) - target).square().mean()
    loss0.backward()
    for name in ("trunk.conv1.weight", "trunk.layer1.0.conv1.weight", "trunk.layer4.0.conv2.weight",
                 "detail.conv_in.0.weight", "detail.stages.1.0.weight", "merge.shared.0.weight",
                 "merge.gamma.weight", "merge.beta.weight", "head.0.weight"):
        grad = E.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    opt = torch.optim.Adam(E.parameters(), lr=3e-3)
    for _ in range(15):
        opt.zero_grad()
        (E(x) - target).square().mean().backward()
        opt.step()
    assert (E(x) - target).square().mean() < 0.7 * loss0.item()


def test_features_depend_on_input_and_not_on_batch_mates():
    E = make(32).eval()
    x = images(3, 32)
    w, feats = E(x, return_features=True)
    _, feats_other = E(images(3, 32, seed=1), return_features=True)
    for name, f, g in zip(E.feature_names, feats, feats_other):
        assert not torch.allclose(f, g), name
    # GroupNorm merge + eval-mode BN: one image's code does not depend on the rest of its batch
    w0, feats0 = E(x[:1], return_features=True)
    torch.testing.assert_close(w0, w[:1], atol=1e-5, rtol=1e-5)
    for f0, f in zip(feats0, feats):
        torch.testing.assert_close(f0, f[:1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# Configs, presets, generator coupling


@pytest.mark.parametrize("space", ["w", "w+"])
def test_config_round_trip(space):
    w_avg = torch.randn(16)
    E = make(32, space=space, w_avg=w_avg, merge_layer="layer4").eval()
    cfg = json.loads(json.dumps(E.config))
    E2 = Encoder.from_config(cfg).eval()
    x = images(2, 32)
    assert not torch.allclose(E2(x), E(x))  # fresh weights, zero w_avg
    E2.load_state_dict(E.state_dict())
    torch.testing.assert_close(E2(x), E(x), atol=0, rtol=0)
    assert E2.config == E.config and Encoder(**cfg).config == E.config
    ec = EncoderConfig.from_dict(cfg)
    assert EncoderConfig.from_dict(ec.to_dict()) == ec and ec.resolved() == ec


def test_presets_match_gan_presets():
    for name, enc in ENCODER_PRESETS.items():
        gan = gan_config.preset(name)
        assert (enc.resolution, enc.w_dim) == (gan.resolution, gan.w_dim), name
        assert encoder_config_for(gan, space="w+").resolved().num_ws == gan.num_ws
    assert ENCODER_PRESETS["tiny"].trunk == "tiny"
    assert ENCODER_PRESETS["demo64"].trunk == "resnet18"
    assert ENCODER_PRESETS["paper128"].trunk == "resnet101"
    assert encoder_config_for("demo64", space="w+").space == "w+"
    with pytest.raises(ValueError, match="unknown preset"):
        encoder_config_for("huge")


def test_for_generator_feeds_the_synthesis_network():
    G = Generator(z_dim=32, w_dim=32, img_resolution=32, mapping_layers=2, channel_base=256,
                  channel_max=32)
    with torch.no_grad():
        G.mapping.w_avg.normal_()
    E = Encoder.for_generator(G, space="w+", tiny_width=8, detail_channels=8, spade_hidden=8,
                              head_hidden=32)
    assert E.config["trunk"] == "tiny" and E.num_ws == G.num_ws
    torch.testing.assert_close(E.w_avg, G.mapping.w_avg)
    E.eval()
    ws = E(images(2, 32))
    img = G.synthesis(ws, noise_mode="const")
    assert list(img.shape) == [2, 1, 32, 32]
    # at init the reconstruction is (nearly) the average image G(w_avg)
    ref = G.synthesis(G.mapping.w_avg.expand(2, -1), noise_mode="const")
    assert (img - ref).abs().max() < 0.1 * ref.abs().max()


# ----------------------------------------------------------------------------------------------
# Local pretrained weights


def _fake_imagenet_resnet18() -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["bn1.running_mean"] = torch.randn(64)  # non-default values, so loading is visible
    sd["layer3.1.bn2.running_var"] = torch.rand(256) + 0.5
    return sd


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_resnet18_with_grey_conv1(tmp_path, suffix):
    sd = _fake_imagenet_resnet18()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    E = make(64, "resnet18", stem="imagenet", pretrained_path=str(path))
    own = E.trunk.state_dict()
    torch.testing.assert_close(own["conv1.weight"], sd["conv1.weight"].sum(1, keepdim=True))
    for key in ("bn1.running_mean", "layer3.1.bn2.running_var", "layer4.1.conv2.weight"):
        torch.testing.assert_close(own[key], sd[key])
    # a checkpoint rebuild does not need the file any more
    path.unlink()
    E2 = Encoder.from_config(E.config)
    assert E2.config["pretrained_path"] == str(path)


def test_pretrained_small_stem_and_bad_files(tmp_path, caplog):
    sd = _fake_imagenet_resnet18()
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    E = make(32, "resnet18")  # 3x3 stem: the 7x7 conv1 cannot be used
    init = E.trunk.conv1.weight.detach().clone()
    assert E.load_trunk_weights(path) == ["conv1.weight"]
    assert torch.equal(E.trunk.conv1.weight, init) and "conv1" in caplog.text
    torch.testing.assert_close(E.trunk.bn1.running_mean, sd["bn1.running_mean"])

    missing = tmp_path / "nope.pth"
    with pytest.raises(ValueError, match="nope.pth"):
        make(64, "resnet18", pretrained_path=str(missing))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="garbage.pth.*cannot read"):
        E.load_trunk_weights(garbage)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("layer4")}, partial)
    with pytest.raises(ValueError, match="partial.pth.*does not fit the resnet18 trunk"):
        E.load_trunk_weights(partial)
    with pytest.raises(ValueError, match="r18.pth.*does not fit the tiny trunk"):
        make(32, "tiny").load_trunk_weights(path)
