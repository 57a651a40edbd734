"""Grad-CAM: every architecture, the ``cam`` command, and a trained model looking at the object."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rsscene import checkpoint
from rsscene.checkpoint import Checkpoint, Preprocess
from rsscene.cli import main
from rsscene.data.images import to_tensor
from rsscene.data.synthetic import CLASSES, image_rng, render_scene
from rsscene.data.transforms import Augment
from rsscene.errors import UserError
from rsscene.explain import explain, gradcam
from rsscene.inference import Predictor
from rsscene.models import MODELS, create_model

pytestmark = pytest.mark.usefixtures("one_thread")

# Trained on 64 px zoomed-in crops, evaluated on whole 128 px scenes: the object keeps its
# apparent size, training stays cheap, and layer4's map is 4x4 instead of 2x2.
TRAINED = ("airplane", "stadium")
SIZE = 128
TRAIN_SIZE = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A ResNet-18 checkpoint trained for about 35 s of one CPU core on 120 built-in scenes."""
    images, labels = [], []
    for label, cls in enumerate(TRAINED):
        for i in range(60):
            img, _ = render_scene(cls, SIZE, image_rng(0, CLASSES.index(cls), i))
            images.append(to_tensor(img))
            labels.append(label)
    x_all, y_all = torch.stack(images), torch.tensor(labels)
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=len(TRAINED), zero_init_residual=True)
    epochs, batch = 20, 16
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.05, total_steps=epochs * -(-len(x_all) // batch)
    )
    augment = Augment(TRAIN_SIZE, scale=(0.25, 0.7))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x_all), generator=g).split(batch):
            loss = torch.nn.functional.cross_entropy(
                model(augment(x_all[idx], g)), y_all[idx], label_smoothing=0.1
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    record = Checkpoint(model.state_dict(), "resnet18", list(TRAINED), preprocess=Preprocess(SIZE))
    return checkpoint.save(record, tmp_path_factory.mktemp("cam") / "trained.pt")


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _corner_scenes(cls: str, n: int) -> list[tuple[Image.Image, tuple[int, int, int, int]]]:
    """``n`` scenes whose object sits well off-centre on both axes, covering under 30%."""
    found = []
    seed = 5000
    while len(found) < n:
        seed += 1
        img, (x0, y0, x1, y1) = render_scene(cls, SIZE, np.random.default_rng(seed))
        off_x, off_y = abs((x0 + x1) / 2 / SIZE - 0.5), abs((y0 + y1) / 2 / SIZE - 0.5)
        if off_x > 0.2 and off_y > 0.2 and (x1 - x0) * (y1 - y0) < 0.3 * SIZE**2:
            found.append((img, (x0, y0, x1, y1)))
    return found


def test_cam_mass_falls_on_the_object(trained):
    predictor = Predictor(trained)
    inside, area = [], []
    for label, cls in enumerate(TRAINED):
        for img, (x0, y0, x1, y1) in _corner_scenes(cls, 10):
            cam, idx, probs = explain(predictor, predictor.load(_png(img)), label)
            assert cam.shape == (SIZE, SIZE) and idx == label
            assert probs.sum() == pytest.approx(1, abs=1e-5)
            inside.append(float(cam[y0:y1, x0:x1].sum() / cam.sum().clamp(min=1e-12)))
            area.append((x1 - x0) * (y1 - y0) / SIZE**2)
    # Uniform attention would put mean(area) of the mass in the boxes; the object draws more.
    assert np.mean(inside) > 1.5 * np.mean(area), (inside, area)


@pytest.mark.parametrize("arch", list(MODELS))
def test_gradcam_runs_on_every_arch(arch):
    torch.manual_seed(0)
    model = create_model(arch, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    cam, idx, probs = gradcam(model, x)
    assert cam.shape == (64, 64) and cam.dtype == torch.float32
    assert float(cam.min()) >= 0 and float(cam.max()) <= 1
    assert idx == int(probs.argmax()) and probs.shape == (5,)
    assert probs.sum() == pytest.approx(1, abs=1e-5)
    cam3, idx3, _ = gradcam(model, x[0], class_idx=3, layer="layer3")
    assert cam3.shape == (64, 64) and idx3 == 3
    # The hook is gone and the weights carry no gradient: a shared model is left as it was.
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


def test_gradcam_refuses_bad_layers():
    model = create_model("resnet18", num_classes=3).eval()
    with pytest.raises(UserError, match=r"layer4\.1"):
        gradcam(model, torch.randn(1, 3, 64, 64), layer="layer9")
    with pytest.raises(UserError, match="feature map"):
        gradcam(model, torch.randn(1, 3, 64, 64), layer="fc")


def test_cam_command(trained, tmp_path, capsys):
    images = tmp_path / "in"
    (images / "sub").mkdir(parents=True)
    for i, (img, _) in enumerate(_corner_scenes("airplane", 2)):
        img.save(images / ("sub" if i else "") / "scene.png")  # same name in two folders
    (images / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    assert main(["cam", str(trained), str(images), "--out", str(out)]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["scene_2_cam.png", "scene_cam.png"]
    assert Image.open(out / "scene_cam.png").size[0] > 2 * SIZE  # image and overlay side by side
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "skipped 1" in captured.out

    assert main(["cam", str(trained), str(images / "scene.png"), "--out", str(out),
                 "--class", "stadium", "--layer", "layer3.1", "--tta", "yes"]) == 0  # fmt: skip
    assert main(["cam", str(trained), str(images), "--out", str(out), "--class", "ship"]) == 2
    assert "this model knows airplane, stadium" in capsys.readouterr().err
    assert main(["cam", str(trained), str(images), "--out", str(out), "--layer", "layer5"]) == 2
    assert "choose one of layer1, layer1.0" in capsys.readouterr().err
