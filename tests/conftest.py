"""Shared fixtures: tiny built-in scenes, their split and a short training run."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rsscene.config import build
from rsscene.data.prepare import prepare
from rsscene.data.synthetic import generate

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shared_data(name: str) -> Path:
    """A real dataset under ../shared/data, or a skip saying why it is missing."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real images not available: {path} is absent (outside the team's machines)")
    return path


def tiny_config(split: Path, out: Path, **overrides) -> object:
    """A configuration that trains in seconds on the CPU, deterministically."""
    values = {
        "data": str(split),
        "arch": "resnet18",
        "epochs": 2,
        "batch_size": 8,
        "img_size": 32,
        "eval_size": 32,
        "device": "cpu",
        "workers": 0,
        "amp": "off",
        "deterministic": True,
        "out": str(out),
    }
    values.update(overrides)
    return build(values)


@pytest.fixture(scope="session")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("scenes")
    generate(raw, per_class=10, size=40, seed=0)
    return raw


@pytest.fixture(scope="session")
def split(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("split") / "split"
    prepare(scenes, dst, test_ratio=0.3, seed=0)
    return dst


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from intra-op threads, and lose a lot on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """MLflow's default store is ./mlruns: keep every test's runs out of the working tree."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", tmp_path_factory.mktemp("mlruns").as_uri())
        yield
