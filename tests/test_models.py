import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedgen.models import Generator, NearestUpsampleConv


@pytest.mark.parametrize("in_channels,out_channels,size", [(32, 16, 7), (3, 5, 4), (16, 8, 14)])
def test_the_folded_layer_is_nearest_upsampling_then_a_convolution(in_channels, out_channels, size):
    torch.manual_seed(0)
    layer = NearestUpsampleConv(in_channels, out_channels).double()
    x = torch.randn(3, in_channels, size, size, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    upsampled = F.interpolate(x, scale_factor=2, mode="nearest")
    expected = F.conv2d(upsampled, layer.weight, layer.bias, padding=1)
    assert y.shape == (3, out_channels, 2 * size, 2 * size)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    # The same gradients too: the generator is trained through this layer.
    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), (x, layer.weight, layer.bias))
    expected_grads = torch.autograd.grad((expected * probe).sum(), (x, layer.weight, layer.bias))
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_folded_layer_starts_from_a_conv2ds_initialisation():
    torch.manual_seed(3)
    layer = NearestUpsampleConv(8, 4)
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 4, 3, padding=1)
    assert torch.equal(layer.weight, conv.weight) and torch.equal(layer.bias, conv.bias)


def _upsample_conv_body(gen: Generator) -> nn.Sequential:
    """The generator's body as it was built before 2026-12-06 (Upsample + Conv2d)."""
    wide, channels = gen.wide, gen.wide // 2
    groups = gen.body[0].num_groups
    return nn.Sequential(
        nn.GroupNorm(groups, wide),
        nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(wide, channels, 3, padding=1),
        nn.GroupNorm(groups // 2 or 1, channels),
        nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(channels, channels // 2, 3, padding=1),
        nn.GroupNorm(groups // 4 or 1, channels // 2),
        nn.ReLU(),
        nn.Conv2d(channels // 2, 1, 3, padding=1),
        nn.Tanh(),
    )


def test_checkpoints_of_the_upsample_conv_generator_load_and_draw_the_same_images():
    torch.manual_seed(0)
    gen = Generator(latent_dim=16, channels=16, num_classes=10, groups=8).double()
    old_body = _upsample_conv_body(gen).double()
    # Both ways: the old layout's weights load into the new one under the same keys.
    old_body.load_state_dict(gen.body.state_dict())
    gen.body.load_state_dict(old_body.state_dict())
    z = torch.randn(6, 16, dtype=torch.float64)
    labels = torch.arange(6)
    h = gen.project(torch.cat([z, gen.label_embedding(labels)], dim=1)).view(-1, gen.wide, 7, 7)
    torch.testing.assert_close(gen(z, labels), old_body(h), rtol=1e-10, atol=1e-10)
