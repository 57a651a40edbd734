"""The ResNet family against the paper's table and torchvision."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision

from rsscene.cli import main
from rsscene.models import MODELS, create_model, from_weights, load_backbone
from rsscene.models.summary import summarize

TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
PAPER_GFLOPS = {
    "resnet18": 1.8,
    "resnet34": 3.6,
    "resnet50": 3.8,
    "resnet101": 7.6,
    "resnet152": 11.3,
}


@pytest.mark.parametrize("arch", list(MODELS))
def test_parameter_count_matches_torchvision(arch: str) -> None:
    model = create_model(arch)
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[arch]


@pytest.mark.parametrize("arch", list(MODELS))
def test_torchvision_weights_load_strict_and_outputs_match(arch: str) -> None:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, arch)(weights=None).eval()
    ours = create_model(arch).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours(x) - reference(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", list(MODELS))
def test_v1_gflops_reproduce_the_paper(arch: str) -> None:
    gflops = summarize(arch, "v1").gflops
    assert abs(gflops - PAPER_GFLOPS[arch]) / PAPER_GFLOPS[arch] < 0.03


def test_v15_resnet50_costs_about_4_1_gflops() -> None:
    assert summarize("resnet50", "v1.5").gflops == pytest.approx(4.1, abs=0.05)


def test_variants_differ_only_in_where_the_bottleneck_strides() -> None:
    v1, v15 = create_model("resnet50", variant="v1"), create_model("resnet50", variant="v1.5")
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    assert {k: v.shape for k, v in v1.state_dict().items()} == {
        k: v.shape for k, v in v15.state_dict().items()
    }


def test_stage_output_sizes_at_224() -> None:
    for arch in MODELS:
        assert summarize(arch).stage_sizes == [112, 56, 28, 14, 7]


@pytest.mark.parametrize("size", [32, 33, 75, 150])
def test_any_input_size_from_32_works(size: int) -> None:
    model = create_model("resnet18", num_classes=5, in_channels=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, size, size)).shape == (1, 5)


def test_zero_init_residual_zeroes_the_last_bn_of_each_block() -> None:
    model = create_model("resnet50", zero_init_residual=True)
    assert all(
        b.bn3.weight.abs().sum() == 0 for layer in (model.layer1, model.layer4) for b in layer
    )
    basic = create_model("resnet18", zero_init_residual=True)
    assert all(b.bn2.weight.abs().sum() == 0 for b in basic.layer2)
    assert create_model("resnet18").layer2[0].bn2.weight.abs().sum() > 0


def test_imagenet_checkpoint_into_five_classes_keeps_backbone(
    tmp_path, capsys: pytest.CaptureFixture
) -> None:
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(source.state_dict(), path)
    model, reinit = from_weights("resnet18", path, num_classes=5)
    assert reinit == ["fc.weight", "fc.bias"]
    assert model.fc.out_features == 5
    assert torch.equal(model.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_mismatched_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        load_backbone(create_model("resnet18"), create_model("resnet34").state_dict())


def test_unknown_arch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown architecture 'resnet19'"):
        create_model("resnet19")


def test_info_prints_the_table_and_json(capsys: pytest.CaptureFixture) -> None:
    assert main(["info"]) == 0
    table = capsys.readouterr().out
    for arch, params in TORCHVISION_PARAMS.items():
        assert arch in table and f"{params:,}" in table
    assert main(["info", "resnet50", "--num-classes", "5", "--img-size", "256", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["stage_sizes"] == [128, 64, 32, 16, 8]
    assert row["params"] == TORCHVISION_PARAMS["resnet50"] - 2048 * 995 - 995
