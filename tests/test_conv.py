"""The convolution whose weight gradient on the CPU is one forward-speed product where oneDNN's
is slow: the same results as ``nn.Conv2d``, taken exactly where it pays."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rsscene.models import create_model
from rsscene.models.conv import WEIGHT_GRADS, Conv2d

FAST = "_ConvWeightGradBackward"


def pair(
    cin: int, cout: int, stride: int = 1, dtype=torch.float64, kernel: int = 3
) -> tuple[Conv2d, nn.Conv2d]:
    options = {"stride": stride, "padding": kernel // 2, "bias": False}
    ours = Conv2d(cin, cout, kernel, **options).to(dtype)
    reference = nn.Conv2d(cin, cout, kernel, **options).to(dtype)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def grads(conv: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    out = conv(x)
    (out * g).sum().backward()
    return out, x.grad, conv.weight.grad


@pytest.mark.parametrize(
    ("kernel", "stride", "cin", "cout", "hw", "fast"),
    [
        (3, 1, 8, 16, (3, 3), True),
        (3, 1, 5, 7, (4, 5), True),  # not square
        (3, 1, 3, 4, (6, 6), True),  # the edge: a 36-pixel output
        (3, 1, 8, 16, (6, 7), False),  # above it
        (3, 2, 8, 16, (6, 6), True),  # 3x3 output
        (3, 2, 5, 7, (7, 5), True),  # odd sides: 4x3
        (3, 2, 8, 16, (8, 8), True),  # the edge: a 16-pixel output
        (3, 2, 8, 16, (9, 9), False),  # 5x5, above it
        (1, 2, 8, 16, (6, 6), True),  # a shortcut: 3x3 output
        (1, 2, 5, 7, (7, 6), True),  # odd sides: 4x3
        (1, 2, 8, 16, (8, 8), True),  # the edge: a 16-pixel output
        (1, 2, 8, 16, (10, 10), False),  # 5x5, above it
        (1, 1, 8, 16, (6, 6), False),  # stride 1: oneDNN's own
    ],
)
def test_gradients_equal_torchs(kernel, stride, cin, cout, hw, fast):
    torch.manual_seed(0)
    ours, reference = pair(cin, cout, stride, kernel=kernel)
    x = torch.randn(5, cin, *hw, dtype=torch.float64)
    out = ours(x.requires_grad_())
    assert (type(out.grad_fn).__name__ == FAST) is fast
    g = torch.randn_like(out)
    for a, b in zip(grads(ours, x, g), grads(reference, x, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("kernel", "stride", "hw"), [(3, 1, 4), (3, 2, 7), (1, 2, 8)])
def test_bfloat16_autocast_matches_torchs_and_keeps_the_weights_layout(kernel, stride, hw):
    torch.manual_seed(0)
    ours, reference = pair(32, 32, stride, torch.float32, kernel)
    for conv in (ours, reference):
        conv.to(memory_format=torch.channels_last)
    x = torch.randn(16, 32, hw, hw).contiguous(memory_format=torch.channels_last)
    results = []
    for conv in (ours, reference):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            out = conv(xi)
        out.float().square().sum().backward()
        results.append((out, xi.grad, conv.weight.grad))
    (out, gx, gw), (ref_out, ref_gx, ref_gw) = results
    assert type(out.grad_fn).__name__ == FAST and out.dtype == torch.bfloat16
    assert gw.dtype == torch.float32 and gw.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref_out)
    # Both are bfloat16 products summed in float32, in another order: equal to bf16's precision.
    torch.testing.assert_close(gx, ref_gx, rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(gw, ref_gw, rtol=2e-2, atol=2e-2 * ref_gw.abs().max().item())


def test_it_is_taken_only_where_it_pays_and_can_be_turned_off():
    conv, _ = pair(4, 4)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert type(conv(x).grad_fn).__name__ == FAST  # the weight alone needs a gradient
    with torch.no_grad():
        assert conv(x).grad_fn is None
    conv.eval()  # evaluating, Grad-CAM, an export's trace: torch's own
    assert type(conv(x).grad_fn).__name__ != FAST
    conv.train()
    conv.weight.requires_grad_(False)  # frozen: nothing to gain
    assert conv(x.requires_grad_()).grad_fn is not None
    assert type(conv(x).grad_fn).__name__ != FAST
    conv.weight.requires_grad_(True)
    assert type(conv(x[0]).grad_fn).__name__ != FAST  # an unbatched image: torch's own
    conv.small_map = 0
    assert type(conv(x).grad_fn).__name__ != FAST


def test_resnet18_takes_it_on_its_last_stages_and_layer4s_shortcut_at_96_px():
    model = create_model("resnet18", num_classes=3)
    seen = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = type(output.grad_fn).__name__

        return record

    for name, m in model.named_modules():
        if isinstance(m, Conv2d):
            m.register_forward_hook(hook(name))
    model(torch.randn(2, 3, 96, 96)).sum().backward()
    fast = {n for n, fn in seen.items() if fn == FAST}
    # Outputs of 3x3 pixels in layer4, 6x6 in layer3: the 3x3 stride-1 convs there (up to 36
    # pixels), layer4's stride-2 one and its 1x1 stride-2 shortcut (up to 16).
    assert {k: largest for k, (_, largest) in WEIGHT_GRADS.items()} == {
        (3, 1, 1): 36, (3, 2, 1): 16, (1, 2, 0): 16,
    }  # fmt: skip
    assert fast == {
        "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2",
        "layer4.0.conv1", "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2",
        "layer4.0.downsample.0",
    }  # fmt: skip
