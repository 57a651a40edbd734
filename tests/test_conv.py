"""The 3x3 convolution whose weight gradient on small CPU maps is a convolution over the batch:
the same results as ``nn.Conv2d``, taken exactly where it pays."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rsscene.models import create_model
from rsscene.models.conv import SMALL_MAP, Conv2d

FAST = "_BatchConvGradBackward"


def pair(cin: int, cout: int, stride: int = 1, dtype=torch.float64) -> tuple[Conv2d, nn.Conv2d]:
    ours = Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False).to(dtype)
    reference = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False).to(dtype)
    reference.load_state_dict(ours.state_dict())
    return ours, reference


def grads(conv: nn.Conv2d, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    out = conv(x)
    (out * g).sum().backward()
    return out, x.grad, conv.weight.grad


@pytest.mark.parametrize(
    ("cin", "cout", "hw", "stride", "fast"),
    [
        (8, 16, (3, 3), 1, True),
        (5, 7, (4, 5), 1, True),  # not square
        (3, 4, (6, 6), 1, True),  # SMALL_MAP's edge
        (8, 16, (6, 7), 1, False),  # above it
        (8, 16, (6, 6), 2, False),  # strided: oneDNN's own
    ],
)
def test_gradients_equal_torchs(cin, cout, hw, stride, fast):
    torch.manual_seed(0)
    ours, reference = pair(cin, cout, stride)
    x = torch.randn(5, cin, *hw, dtype=torch.float64)
    out = ours(x.requires_grad_())
    assert (type(out.grad_fn).__name__ == FAST) is fast
    g = torch.randn_like(out)
    for a, b in zip(grads(ours, x, g), grads(reference, x, g), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bfloat16_autocast_matches_torchs_and_keeps_the_weights_layout():
    torch.manual_seed(0)
    ours, reference = pair(32, 32, dtype=torch.float32)
    for conv in (ours, reference):
        conv.to(memory_format=torch.channels_last)
    x = torch.randn(16, 32, 4, 4).contiguous(memory_format=torch.channels_last)
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
    conv.small_map = 0
    assert type(conv(x).grad_fn).__name__ != FAST


def test_resnet18_takes_it_on_its_last_stage_at_96_px():
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
    # 3x3 maps in layer4, 6x6 in layer3 (36 pixels, SMALL_MAP): the stride-1 convs there.
    assert SMALL_MAP == 36
    assert fast == {
        "layer3.0.conv2", "layer3.1.conv1", "layer3.1.conv2",
        "layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2",
    }  # fmt: skip
