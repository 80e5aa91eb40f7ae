"""Architectures: every registered model builds, normalises its own input and names its head."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from d3tune.models import MODELS, ModelSpec, Normalize, build_model

DIGITS = ModelSpec(num_classes=10, in_channels=1, image_size=16, mean=(0.5,), std=(0.25,))
CIFAR = ModelSpec(num_classes=10, in_channels=3, image_size=32,
                  mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
SPECS = {"digits16": DIGITS, "cifar32": CIFAR}

_cache: dict[tuple[str, str], nn.Module] = {}


def _built(name: str, spec_id: str) -> nn.Module:
    """Build once per (model, spec) under seed 0: VGG-19 alone is 140 M parameters."""
    if (name, spec_id) not in _cache:
        torch.manual_seed(0)
        _cache[name, spec_id] = build_model(name, SPECS[spec_id]).eval()
    return _cache[name, spec_id]


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_expected_models_are_registered():
    assert {"cnn", "preactresnet18", "vgg19_bn", "vit_small"} <= set(MODELS)


@pytest.mark.parametrize("spec_id", list(SPECS))
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_uint8_equals_float(name: str, spec_id: str):
    spec = SPECS[spec_id]
    model = _built(name, spec_id)
    torch.manual_seed(1)
    x = torch.randint(0, 256, (2, spec.in_channels, spec.image_size, spec.image_size),
                      dtype=torch.uint8)
    with torch.no_grad():
        logits = model(x)
        logits_float = model(x.float() / 255.0)
    assert logits.shape == (2, spec.num_classes)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, logits_float, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_first_module_is_normalize(name: str):
    model = _built(name, "digits16")
    first = next(iter(model.children()))
    assert isinstance(first, Normalize)


@pytest.mark.parametrize("name", list(MODELS))
def test_head_module_exists_and_has_linear(name: str):
    model = _built(name, "cifar32")
    head = dict(model.named_modules())[MODELS[name].head]
    assert any(isinstance(m, nn.Linear) for m in head.modules())
    last_linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    assert last_linear.out_features == CIFAR.num_classes


@pytest.mark.parametrize("name", list(MODELS))
def test_initialisation_is_deterministic(name: str):
    torch.manual_seed(0)
    again = build_model(name, DIGITS)
    first = _built(name, "digits16").state_dict()
    for key, value in again.state_dict().items():
        assert torch.equal(value, first[key]), key


def test_preactresnet18_head_is_linear_512():
    model = _built("preactresnet18", "cifar32")
    assert MODELS["preactresnet18"].head == "linear"
    head = model.linear
    assert type(head) is nn.Linear
    assert (head.in_features, head.out_features) == (512, 10)


def test_preactresnet18_parameter_count_matches_backdoorbench():
    # BackdoorBench's PreActResNet18(num_classes=10) on CIFAR-10 (3 channels): 11,171,146.
    assert _n_params(_built("preactresnet18", "cifar32")) == 11_171_146
    # Only the stem conv depends on the channels: 64 * 9 weights per input channel.
    assert _n_params(_built("preactresnet18", "digits16")) == 11_171_146 - 2 * 64 * 9


def test_vgg19_bn_matches_torchvision_layout():
    """BackdoorBench's vgg19_bn is torchvision's; same keys, same parameter count, same logits."""
    tv_models = pytest.importorskip("torchvision.models")
    ours = _built("vgg19_bn", "cifar32")
    theirs = tv_models.vgg19_bn(num_classes=10).eval()
    weights = {k: v for k, v in ours.state_dict().items() if not k.startswith("normalize.")}
    theirs.load_state_dict(weights)  # strict: keys and shapes must match exactly
    assert _n_params(ours) == _n_params(theirs) == 139_622_218
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        expected = theirs(ours.normalize(x))
        torch.testing.assert_close(ours(x), expected)


def test_vgg19_bn_keeps_at_least_one_pixel_on_small_inputs():
    pools = lambda m: sum(isinstance(x, nn.MaxPool2d) for x in m.features)  # noqa: E731
    assert pools(_built("vgg19_bn", "cifar32")) == 5
    assert pools(_built("vgg19_bn", "digits16")) == 4  # 16 -> 1 px after four pools


@pytest.mark.parametrize("name", ["cnn", "preactresnet18", "vit_small"])
def test_works_at_64_px(name: str):
    spec = ModelSpec(num_classes=200, in_channels=3, image_size=64, mean=(0.5,) * 3,
                     std=(0.25,) * 3)
    model = build_model(name, spec).eval()
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    assert logits.shape == (1, 200)


def test_vit_patch_size_follows_image_size():
    assert _built("vit_small", "digits16").patch_embed.kernel_size == (2, 2)
    assert _built("vit_small", "cifar32").patch_embed.kernel_size == (4, 4)
    with pytest.raises(ValueError, match="patch size"):
        build_model("vit_small", ModelSpec(10, 3, 30, (0.5,) * 3, (0.25,) * 3))


def test_normalize_known_values():
    norm = Normalize(mean=(0.5, 0.25), std=(0.25, 0.5))
    x = torch.tensor([[[[0, 255]], [[0, 255]]]], dtype=torch.uint8)  # shape 1, 2, 1, 2
    expected = torch.tensor([[[[-2.0, 2.0]], [[-0.5, 1.5]]]])
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(norm(x.float() / 255.0), expected)
    assert norm(torch.full((1, 2, 1, 1), 0.5)).flatten().tolist() == [0.0, 0.5]
    assert not list(norm.parameters())  # buffers, not trainable
    assert {k for k, _ in norm.named_buffers()} == {"mean", "std"}
