"""Generator backbones, the frozen feature extractor, and the discriminator's shape (§4.1)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastmlgan.errors import ConfigError
from fastmlgan.models import Discriminator, build_feature_extractor, build_generator


@pytest.mark.parametrize(
    "backbone,feature_dim,size",
    [("smallcnn", 256, 32), ("resnet18", 512, 64), ("resnet50", 2048, 64), ("vgg16", 4096, 64), ("inception_v3", 2048, 80)],
)
def test_generator_head_replaced(backbone, feature_dim, size):
    torch.manual_seed(0)
    g = build_generator(backbone, 80, width=32)
    assert g.feature_dim == feature_dim
    assert isinstance(g.head, nn.Linear) and g.head.out_features == 80 and g.head.in_features == feature_dim
    g.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = g(x)
        assert logits.shape == (2, 80)
        # The logits are the head applied to the trunk's features: nothing else sits in between.
        torch.testing.assert_close(logits, g.head(g.trunk(x)))


def test_feature_extractor_is_a_frozen_copy():
    torch.manual_seed(0)
    g = build_generator("smallcnn", 6, width=8)
    f = build_feature_extractor(g, "phase1")
    assert all(not p.requires_grad for p in f.parameters())
    f.train()
    assert not f.training and not any(m.training for m in f.modules())
    x = torch.randn(3, 3, 32, 32)
    g.eval()
    before = f(x)
    torch.testing.assert_close(before, g.trunk(x))
    # Training G afterwards leaves f_ext unchanged (a copy, §4.1).
    with torch.no_grad():
        for p in g.parameters():
            p.add_(1.0)
    torch.testing.assert_close(f(x), before)


def test_pretrained_local_file_and_errors(tmp_path):
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    g = build_generator("resnet18", 10, pretrained=str(path))
    torch.testing.assert_close(g.trunk.conv1.weight, ref.conv1.weight)
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ConfigError, match="does not match torchvision's resnet18"):
        build_generator("resnet18", 10, pretrained=str(bad))
    with pytest.raises(ConfigError, match="file not found"):
        build_generator("resnet18", 10, pretrained=str(tmp_path / "missing.pth"))
    with pytest.raises(ConfigError, match="unknown weights for resnet18.*IMAGENET1K_V1"):
        build_generator("resnet18", 10, pretrained="IMAGENET9K")
    with pytest.raises(ConfigError, match="unknown"):
        build_generator("resnet7", 10)


def test_offline_download_error_says_how_to_pass_a_file(monkeypatch):
    import urllib.error

    import torchvision

    def offline(*a, **k):
        if k.get("weights") is not None:
            raise urllib.error.URLError("no network")
        return torchvision.models.resnet18()

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(ConfigError, match=r"could not download.*--model.pretrained /path/to/resnet18-"):
        build_generator("resnet18", 10, pretrained="ResNet18_Weights.IMAGENET1K_V1")


def _hidden_linears(d: Discriminator) -> list[nn.Linear]:
    return [m for m in d.body if isinstance(m, nn.Linear)]


def test_discriminator_architecture():
    # §4.1: both inputs projected to 256, concatenated, 8 FC layers of 512 with LeakyReLU, one scalar.
    d = Discriminator(80, 2048)
    linears = _hidden_linears(d)
    assert len(linears) == 8 and all(m.out_features == 512 for m in linears)
    assert linears[0].in_features == 512  # 256 + 256
    assert d.label_proj.out_features == 256 and d.feature_proj.in_features == 2048
    assert sum(isinstance(m, nn.LeakyReLU) for m in d.modules()) == 8
    assert d(torch.rand(4, 80), torch.randn(4, 2048)).shape == (4,)
    u = Discriminator(80, 2048, conditional=False)
    assert _hidden_linears(u)[0].in_features == 256
    assert u(torch.rand(4, 80), None).shape == (4,)


def test_inception_input_transform_does_not_depend_on_the_weights_source(tmp_path):
    # torchvision enables transform_input only when it loads weights by name; the attribute is not
    # in the state dict. A local file, a random start and a re-built checkpoint must agree.
    import torchvision

    random_start = build_generator("inception_v3", 5)
    path = tmp_path / "inception.pth"
    torch.save(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    from_file = build_generator("inception_v3", 5, pretrained=str(path))
    assert random_start.trunk.transform_input is True
    assert from_file.trunk.transform_input is True
