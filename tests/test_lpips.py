"""LPIPS from local files: distances, gradients, clear errors (no download ever)."""

import pytest
import torch
from torchvision.models import vgg16

from cxredit.metrics.lpips import LPIPS


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("lpips")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        feats = vgg16(weights=None).features.state_dict()
        lin = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1)
               for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save({f"features.{k}": v for k, v in feats.items()}, root / "vgg16.pth")
    torch.save(lin, root / "vgg.pth")
    return f"{root / 'vgg.pth'},{root / 'vgg16.pth'}", lin


def test_lpips_zero_on_identity_positive_otherwise_and_differentiable(weights):
    lp = LPIPS(weights[0])
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 32, 32, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 1, 32, 32, generator=g)).clamp(-1, 1)
    assert torch.allclose(lp(x, x), torch.zeros(3), atol=1e-7)
    d = lp(x, y)
    assert d.shape == (3,) and (d > 0).all()
    # per image: a batch gives the same distances as images one by one
    assert torch.allclose(torch.cat([lp(x[i:i + 1], y[i:i + 1]) for i in range(3)]), d,
                          rtol=1e-4, atol=1e-6)
    # the linear weights matter: zeroing them zeroes the distance
    lp.lin.zero_()
    assert torch.allclose(lp(x, y), torch.zeros(3))
    lp2 = LPIPS(weights[0])
    z = y.clone().requires_grad_(True)
    lp2(x, z).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_lpips_bad_files_name_the_file(tmp_path, weights):
    lin_path, vgg_path = weights[0].split(",")
    with pytest.raises(ValueError, match="LIN_WEIGHTS,VGG16_WEIGHTS"):
        LPIPS(lin_path)
    with pytest.raises(ValueError, match="missing.pth: LPIPS weight file not found"):
        LPIPS(f"{tmp_path / 'missing.pth'},{vgg_path}")
    torch.save({"lin0.model.1.weight": torch.rand(1, 3, 1, 1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not LPIPS VGG linear weights"):
        LPIPS(f"{tmp_path / 'bad.pth'},{vgg_path}")
    with pytest.raises(ValueError, match="not VGG-16 weights"):
        LPIPS(f"{lin_path},{tmp_path / 'bad.pth'}")


def test_projection_adds_lpips_to_its_loss():
    from cxredit.latent.project import project_images
    from cxredit.models.stylegan2 import Generator

    class ConstantDistance(torch.nn.Module):  # stands in for LPIPS: +0.25 per image
        def forward(self, x, y):
            return torch.full((len(x),), 0.25) + 0 * (x - y).sum(dim=(1, 2, 3))

    with torch.random.fork_rng():
        torch.manual_seed(0)
        G = Generator(z_dim=8, w_dim=8, img_resolution=16, channel_base=128, channel_max=16,
                      mapping_layers=2).eval().requires_grad_(False)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    plain = project_images(G, x, steps=3, seeds=[1, 2])
    with_lp = project_images(G, x, steps=3, seeds=[1, 2], lpips_weights=ConstantDistance())
    assert torch.allclose(with_lp["loss_history"], plain["loss_history"] + 0.25, atol=1e-6)
