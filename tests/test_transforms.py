"""The batch transforms: the warp's flips and rotations, constants made once, draws on the
generator's device."""

from __future__ import annotations

import pytest
import torch

from rsscene.data import transforms
from rsscene.data.transforms import Augment, dihedral, normalize
from rsscene.engine import recipe


def test_the_warp_draws_the_eight_flips_and_rotations_that_dihedral_names() -> None:
    x = torch.rand(16, 3, 12, 12) * 255
    warp = Augment(12, crop=False, dihedral=True, normalize=False)
    out = warp(x, torch.Generator().manual_seed(7))
    # The warp's first draw is each image's k, from the same generator; its warp is the
    # inverse of dihedral's k (rotations by 90 and 270 degrees trade places, flips are their own).
    k = torch.randint(0, 8, (16,), generator=torch.Generator().manual_seed(7))
    assert set(k.tolist()) >= {1, 3, 4, 6, 7}
    for i, ki in enumerate(k.tolist()):
        inverse = (4 - ki) % 4 if ki < 4 else ki
        want = dihedral(x[i : i + 1], inverse) / 255
        torch.testing.assert_close(out[i : i + 1], want, atol=1e-3, rtol=0)


def test_a_constant_first_made_in_inference_mode_still_serves_autograd() -> None:
    mean, std = (0.31, 0.42, 0.53), (0.21, 0.22, 0.23)  # in no other test: made here first
    with torch.inference_mode():
        normalize(torch.rand(1, 3, 4, 4), mean=mean, std=std, scale=1.0)
    leaf = torch.rand(2, 3, 4, 4, requires_grad=True)
    normalize(leaf * 1.0, mean=mean, std=std, scale=1.0).sum().backward()
    torch.testing.assert_close(
        leaf.grad, torch.full_like(leaf, 1.0).div(torch.tensor(std).view(1, 3, 1, 1))
    )


@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixup_and_cutmix_mix_each_target_as_its_image(mixup: float, cutmix: float) -> None:
    # Image i is filled with the value i and is of class i, so a mixed image's mean pixel is
    # the class index its soft target averages to.
    x = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 3, 16, 16).clone()
    for seed in range(6):
        mixed = x.clone()
        target = recipe.mix_batch(
            mixed, torch.arange(8), 8, mixup, cutmix, torch.Generator().manual_seed(seed)
        )
        torch.testing.assert_close(target.sum(1), torch.ones(8))
        torch.testing.assert_close(mixed.mean((1, 2, 3)), target @ torch.arange(8.0))
        assert not torch.equal(mixed, x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_augmenting_and_mixing_neither_sync_nor_copy_up(monkeypatch) -> None:
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, device="cuda")
    y = torch.randint(0, 4, (8,), device="cuda")
    warp = Augment(24, scale=(0.5, 1.0), jitter=0.1)
    warp(x, torch.Generator("cuda").manual_seed(3))  # the first call makes the tables there

    def no_copy_up(t: torch.Tensor, device: torch.device) -> torch.Tensor:
        assert t.device.type != "cpu", f"a {tuple(t.shape)} tensor copied up from the host"
        return t.to(device)

    monkeypatch.setattr(transforms, "to_device", no_copy_up)
    monkeypatch.setattr(recipe, "to_device", no_copy_up)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for mixup, cutmix in [(0.0, 0.0), (0.2, 0.0), (0.0, 1.0)]:
            g = torch.Generator("cuda").manual_seed(4)
            out = warp(x, g)
            target = recipe.mix_batch(out, y, 4, mixup, cutmix, g)
            assert out.device.type == target.device.type == "cuda"
    finally:
        torch.cuda.set_sync_debug_mode(0)
