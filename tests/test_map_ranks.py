"""rsscene map under torchrun: the ranks share a region's scenes, or one scene's windows, and
the maps and tables equal one process's, pixel for pixel and row for row; a refusal or a
failure on one rank stops them all; an interrupted region resumes."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rsscene.cli import main
from rsscene.data.synthetic import CLASSES
from rsscene.device import Dist
from rsscene.errors import UserError
from rsscene.mapping.ranks import agree, block, exchange, share
from test_images import tiny_checkpoint

rasterio = pytest.importorskip("rasterio", reason="GeoTIFF maps need the geo extra (rasterio)")
from rasterio.transform import from_origin  # noqa: E402 - after the skip

pytestmark = pytest.mark.usefixtures("one_thread")

# One thread per process, in the ranks as in this one: the same kernels, the same bits.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="signals to process groups")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return tiny_checkpoint(tmp_path_factory.mktemp("ranks") / "model.pt", classes=list(CLASSES))


def geotiff(path: Path, height: int, width: int, seed: int, x0: float = 500000.0) -> Path:
    """An RGB GeoTIFF of 10 m pixels (0 is nodata) with its top-left corner at (x0, 4200000)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(1, 255, (3, height, width), dtype=np.uint8)
    profile = {"driver": "GTiff", "width": width, "height": height, "count": 3, "dtype": "uint8"}
    profile |= {"crs": "EPSG:32633", "transform": from_origin(x0, 4200000.0, 10.0, 10.0)}
    with rasterio.open(path, "w", nodata=0, **profile) as dst:
        dst.write(pixels)
    return path


def region(folder: Path, sizes: list[int]) -> list[Path]:
    """Scenes of ``sizes`` px side by side in one CRS (uneven work for the ranks to balance)."""
    return [
        geotiff(folder / f"s{i}.tif", size, size, seed=i, x0=500000.0 + 10_000 * i)
        for i, size in enumerate(sizes)
    ]


def torchrun(*args: object, timeout: float = 300) -> subprocess.CompletedProcess:
    """``rsscene map`` under torchrun with 2 CPU processes (Gloo), to its end."""
    return subprocess.run(
        torchrun_cmd(*args), env=ENV, capture_output=True, text=True, timeout=timeout
    )


def torchrun_cmd(*args: object) -> list[str]:
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    return [*head, "2", "-m", "rsscene", "map", *map(str, args)]


def said(stderr: str) -> list[str]:
    """The ranks' one-line errors (two ranks' lines may interleave on one stream)."""
    return re.findall(r"rsscene map: error: (.*?)(?=rsscene map: |\n|$)", stderr)


def read(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        assert src.crs is not None
        return src.read()


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def as_written(path: Path, out: Path) -> dict:
    """A JSON file with its folder's path taken out, and no timings."""
    data = json.loads(path.read_text().replace(str(out), "OUT"))
    data.pop("predict_seconds", None)
    return data


def assert_same_map(one: Path, two: Path, files: list[str]) -> None:
    """Two map folders hold the same map: pixels, rows, summary (timings and paths aside)."""
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))
    for name in files:
        a, b = read(one / name), read(two / name)
        # Bit for bit (NaN, the nodata cells' probability, is not equal to itself).
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), name
    assert rows(one / "tiles.csv") == rows(two / "tiles.csv")
    assert as_written(one / "summary.json", one) == as_written(two / "summary.json", two)


# --------------------------------------------------------------------------- the shares
def test_scenes_are_shared_heaviest_first_the_same_way_every_time() -> None:
    weights = [25, 100, 0, 64, 36, 100]
    owners = share(weights, 2)
    assert owners == share(weights, 2) == [1, 0, 1, 0, 1, 1]
    loads = [sum(w for w, r in zip(weights, owners, strict=True) if r == k) for k in (0, 1)]
    assert loads == [164, 161]
    assert share(weights, 1) == [0] * 6 and share([], 3) == []
    assert sorted(share([1] * 7, 3)) == [0, 0, 0, 1, 1, 2, 2]


def test_batches_are_shared_in_contiguous_blocks_in_order() -> None:
    for count in range(12):
        for world in (1, 2, 3, 5):
            blocks = [block(count, r, world) for r in range(world)]
            assert [i for b in blocks for i in b] == list(range(count))
            assert max(map(len, blocks)) - min(map(len, blocks)) <= 1
            assert [len(b) for b in blocks] == sorted((len(b) for b in blocks), reverse=True)


def test_one_process_exchanges_nothing_and_raises_as_it_always_has() -> None:
    one = Dist()
    assert exchange(one, lambda: 7) == [7] and agree(one, lambda: "x") == "x"

    def refuse() -> None:
        raise UserError("no such scene")

    with pytest.raises(UserError, match="no such scene"):
        agree(one, refuse)


def store_ranks(timeout: float) -> list[Dist]:
    store = torch.distributed.HashStore()
    return [Dist(r, 2, r, enabled=True, store=store, timeout=timeout) for r in range(2)]


def test_a_rank_waits_for_one_that_works_longer_than_the_timeout() -> None:
    waiting, working = store_ranks(timeout=0.5)
    started = time.monotonic()

    def work() -> None:
        for _ in range(15):  # 1.5 s of work, beating every 0.1 s
            time.sleep(0.1)
            working.beat()
        working.wait_for_all()

    thread = threading.Thread(target=work)
    thread.start()
    waiting.wait_for_all()
    thread.join()
    assert time.monotonic() - started >= 1.5


def test_a_rank_gives_up_on_one_that_is_not_heard_from() -> None:
    waiting, _silent = store_ranks(timeout=0.5)
    started = time.monotonic()
    with pytest.raises(UserError, match="rank 1 of 2 was not heard from for 0 s"):
        waiting.wait_for_all()
    assert 0.5 <= time.monotonic() - started < 5


def test_overlapping_windows_sum_to_other_bits_in_another_order(model: Path, tmp_path: Path):
    """Why rank 0 adds the windows one by one in one process's order: adding each rank's
    partial sums gives other float32 bits on this test's overlapping scene, so the torchrun
    test below, which asks for the same bits, would see it."""
    from rsscene.inference import Predictor
    from rsscene.mapping.scenes import open_scene
    from rsscene.mapping.tiling import Progress, _predict_batches, make_grid

    predictor, scene = Predictor(model), open_scene(overlap_scene(tmp_path))
    grid = make_grid(scene, 32, 8)
    order = list(grid.windows())
    batches = [order[s : s + 4] for s in range(0, len(order), 4)]
    parts: list = []
    _predict_batches(
        predictor, scene, grid, batches, False, None, Progress(0, False), parts.append, None
    )
    scene.close()
    span, k = grid.span, len(CLASSES)

    def summed(parts: list) -> np.ndarray:
        total = np.zeros((grid.rows, grid.cols, k), np.float32)
        for kept, probs, _ in parts:
            for (i, j), p in zip(kept, probs, strict=True):
                total[i : i + span, j : j + span] += p
        return total

    halves = [summed([parts[n] for n in block(len(parts), r, 2)]) for r in range(2)]
    assert not np.array_equal(summed(parts), halves[0] + halves[1])


def overlap_scene(folder: Path) -> Path:
    """64 x 96 px, its lower right corner nodata: with 32 px windows every 8 px, 45 windows
    (some skipped as nodata), 4 to a batch, cells covered by up to 16 windows of both ranks."""
    path = geotiff(folder / "scene.tif", 64, 96, seed=3)
    with rasterio.open(path, "r+") as dst:
        pixels = dst.read()
        pixels[:, 40:, 60:] = 0
        dst.write(pixels)
    return path


RANK = """
from rsscene.device import setup, teardown
from rsscene.errors import UserError
from rsscene.mapping.ranks import exchange

ranks = setup("cpu")


def work():
    if ranks.rank == 1:
        raise UserError("scene.tif: corrupt")
    return "mapped"


try:
    exchange(ranks, work)
except UserError as e:
    print(f"{ranks.rank}: {e}")
print(f"{ranks.rank}: {exchange(ranks, lambda: ranks.rank * 10)}")
teardown()
"""


def test_an_error_on_one_rank_is_raised_on_every_rank(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK],
            env={**ENV, **world, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    # Rank 0 raises rank 1's error, and the two go on together (the next exchange works).
    assert outputs[0].splitlines() == ["0: rank 1 of 2 stopped: scene.tif: corrupt", "0: [0, 10]"]
    assert outputs[1].splitlines() == ["1: scene.tif: corrupt", "1: [0, 10]"]


# --------------------------------------------------------------------------- under torchrun
def test_two_ranks_share_a_region_and_write_what_one_process_writes(
    model: Path, tmp_path: Path, capsys
) -> None:
    scenes = region(tmp_path / "scenes", [96, 64, 64, 32])
    args = [model, *scenes, "--tile", "32", "--amp", "off", "--probabilities"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["map", *map(str, args), "--out", str(one)]) == 0
    capsys.readouterr()
    done = torchrun(*args, "--out", two)
    assert done.returncode == 0, done.stderr[-4000:]
    # s0 (96 px: 9 windows) on rank 0; s1, s2 and s3 (4 + 4 + 1) on rank 1.
    for i, (rank, windows) in enumerate([(0, 9), (1, 4), (1, 4), (1, 1)]):
        line = f"[{i + 1}/4] {scenes[i]} -> {two / f's{i}'}: mapped, {windows} windows in "
        assert re.search(re.escape(line) + rf"[\d.]+ s \(rank {rank}\)", done.stdout), line
    assert done.stdout.count("region of 4 scenes") == 1  # rank 0 prints the region
    for name in ["s0", "s1", "s2", "s3"]:
        assert_same_map(one / name, two / name, ["classes.tif", "probabilities.tif"])
    assert (one / "tiles.csv").read_bytes() == (two / "tiles.csv").read_bytes()
    assert as_written(one / "region.json", one) == as_written(two / "region.json", two)
    assert np.array_equal(read(one / "classes.vrt"), read(two / "classes.vrt"))


def test_two_ranks_share_one_scenes_overlapping_windows_to_the_same_bits(
    model: Path, tmp_path: Path, capsys
) -> None:
    scene = overlap_scene(tmp_path)
    args = [model, scene, "--tile", "32", "--stride", "8", "--batch-size", "4", "--amp", "off"]
    args += ["--probabilities"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["map", *map(str, args), "--out", str(one)]) == 0
    capsys.readouterr()
    done = torchrun(*args, "--out", two)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((two / "summary.json").read_text())
    assert summary["windows_skipped_nodata"] > 0 and summary["windows"] > 0
    assert done.stdout.count("windows predicted") == 1  # rank 0 prints the summary
    assert_same_map(one, two, ["classes.tif", "probabilities.tif"])


def test_a_refusal_stops_every_rank_before_anything_is_written(model: Path, tmp_path: Path) -> None:
    scenes = region(tmp_path / "scenes", [32, 32])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    started = time.monotonic()
    done = torchrun(model, *scenes, "--tile", "32", "--out", out, timeout=120)
    assert done.returncode != 0 and time.monotonic() - started < 120
    # Each rank refuses alike (torchrun may stop one before it prints, once the other ended).
    errors = said(done.stderr)
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, done.stderr[-4000:]
    assert "not empty and not an rsscene region (it holds notes.txt)" in errors[0]
    assert os.listdir(out) == ["notes.txt"]


def test_a_scene_that_fails_on_one_rank_stops_both(model: Path, tmp_path: Path) -> None:
    scenes = region(tmp_path / "scenes", [64, 64])
    data = scenes[1].read_bytes()
    scenes[1].write_bytes(data[: len(data) * 2 // 3])  # the header reads; the pixels do not
    out = tmp_path / "out"
    done = torchrun(model, *scenes, "--tile", "32", "--out", out, timeout=120)
    assert done.returncode != 0
    errors = said(done.stderr)
    # Rank 1 says what failed. Rank 0 raises too (rank 1's error, named), but torchrun may
    # stop it first, once rank 1 has ended: test_an_error_on_one_rank_is_raised_on_every_rank.
    own = [e for e in errors if "rank 1 of 2 stopped: " not in e]
    assert len(own) == 1 and len(errors) <= 2, done.stderr[-4000:]
    assert own[0].startswith(f"{scenes[1]}: corrupt or truncated")
    # The scene rank 0 mapped stays; no region files, nothing half-written.
    assert sorted(os.listdir(out)) == ["s0"]
    assert sorted(os.listdir(out / "s0")) == [
        "classes.tif",
        "overlay.png",
        "summary.json",
        "tiles.csv",
    ]


@pytest.mark.slow
@linux_only
def test_sigterm_keeps_finished_scenes_and_the_same_command_resumes(
    model: Path, tmp_path: Path, capsys
) -> None:
    scenes = region(tmp_path / "scenes", [256] * 6)
    args = [model, *scenes, "--tile", "32", "--amp", "off", "--batch-size", "8"]
    two = tmp_path / "two"
    proc = subprocess.Popen(
        torchrun_cmd(*args, "--out", two),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not list(two.glob("*/summary.json")):
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # to torchrun, as a scheduler would
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert "the same command continues from there" in output, output[-4000:]
    finished = sorted(p.parent.name for p in two.glob("*/summary.json"))
    assert 1 <= len(finished) < 6 and not (two / "region.json").exists()
    assert sorted(os.listdir(two)) == finished  # no half-written scene, no hidden leftovers

    done = torchrun(*args, "--out", two)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("skipped (mapped earlier)") == len(finished)
    one = tmp_path / "one"
    assert main(["map", *map(str, args), "--out", str(one)]) == 0
    capsys.readouterr()
    for name in [f"s{i}" for i in range(6)]:
        assert_same_map(one / name, two / name, ["classes.tif"])
    assert as_written(one / "region.json", one) == as_written(two / "region.json", two)


@pytest.mark.slow
def test_the_map_benchmark_maps_a_region_with_one_and_two_processes(tmp_path: Path) -> None:
    out = tmp_path / "region.json"
    benchmark = Path(__file__).parents[1] / "benchmarks" / "map.py"
    argv = ["--scenes", "2", "--size", "600", "--tile", "200", "--img-size", "32"]
    argv += ["--workdir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(
        [sys.executable, str(benchmark), *argv], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "scaling, 2 processes over 1: " in done.stdout
    runs = json.loads(out.read_text())["runs"]
    assert list(runs) == ["1 process", "2 processes (torchrun)"]
    assert [r["windows"] for r in runs.values()] == [18, 18]
    assert [sorted(p["rank"] for p in r["ranks"]) for r in runs.values()] == [[0], [0, 1]]
    assert all(p["peak_rss_mib"] > 0 for r in runs.values() for p in r["ranks"])
