"""The benchmarks run end to end at a tiny setting and print their tables."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import shared_data

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def run_benchmark(script: str, argv: list[str]) -> str:
    """Run ``benchmarks/SCRIPT`` with ``argv``; returns its stdout once it exits with 0."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_throughput_tiny(tmp_path):
    out = tmp_path / "result.json"
    # One thread: on a shared CPU, threads waiting for each other cost more than they add.
    tiny = "--steps 2 --warmup 1 --img-size 32 --batch-size 4 --scene-size 48 --workers 0"
    tiny += " --device cpu --threads 1"
    stdout = run_benchmark("throughput.py", [*tiny.split(), "--json", str(out)])
    table = [line for line in stdout.splitlines() if line.startswith("| (")]
    assert [line.split("|")[1].strip() for line in table] == [
        "(a) tutorial",
        "(b) torchvision reference",
        "(c) rsscene",
    ]
    rows = json.loads(out.read_text())["rows"]
    for r in rows:
        assert min(*r["train"].values(), *r["infer"].values(), r["peak_rss_mib"]) > 0
    rsscene = rows[2]
    assert rsscene["cache"] == "memory"
    assert rsscene["cache_shape"] == [10, 3, 32, 32]  # stored at the training size, no larger
    assert rsscene["cache_mib"] == 10 * 3 * 32 * 32 / 2**20


@pytest.mark.slow
def test_imbalance_benchmark_tiny(tmp_path):
    out = tmp_path / "result.json"
    argv = ["--epochs", "1", "--seeds", "1", "--img-size", "32", "--train-counts", "8", "4"]
    argv += ["--test-per-class", "4", "--workdir", str(tmp_path), "--json", str(out)]
    stdout = run_benchmark("imbalance.py", argv)
    assert "| --class-weights balanced |" in stdout
    results = json.loads(out.read_text())
    assert list(results) == ["none", "--class-weights balanced", "--sampler balanced"]
    assert all(r[0]["images"] == {"train": 12, "test": 8} for r in results.values())


def test_map_benchmark_tiny(tmp_path):
    pytest.importorskip("rasterio", reason="the map benchmark writes a GeoTIFF (geo extra)")
    out = tmp_path / "map.json"
    tiny = ["--size", "600", "--tile", "200", "--img-size", "32", "--loop-tiles", "3"]
    run_benchmark("map.py", [*tiny, "--json", str(out)])
    runs = json.loads(out.read_text())["runs"]
    assert [r["tiles"] for r in runs.values()] == [3, 9, 9]
    assert all(r["peak_rss_mib"] > 0 and r["predict"] > 0 for r in runs.values())


def test_peer_benchmark_tiny(tmp_path, scenes):
    pytest.importorskip("timm", reason="the peer benchmark trains timm's recipe (peer extra)")
    out = tmp_path / "peer.json"
    argv = ["--data", str(scenes), "--epochs", "2", "--img-size", "32", "--workers", "0"]
    argv += [
        "--recipes",
        "timm",
        "default",
        "--json",
        str(out),
        "--figure",
        str(tmp_path / "f.png"),
    ]
    stdout = run_benchmark("peer.py", argv)
    rows = [
        line
        for line in stdout.splitlines()
        if line.startswith("| timm") or line.startswith("| rsscene")
    ]
    assert [r.split("|")[1].strip() for r in rows] == ["timm train.py recipe", "rsscene default"]
    results = json.loads(out.read_text())
    for r in results.values():
        assert [e["epoch"] for e in r["epochs"]] == [1, 2]
        assert all(0 <= e["test_acc"] <= 1 and e["seconds"] > 0 for e in r["epochs"])
        assert r["wall_seconds"] > r["train_seconds"] > 0
    assert (tmp_path / "f.png").stat().st_size > 0


def test_step_and_epoch_end_benchmarks_tiny():
    step = ["--img-size", "32", "--batch-size", "4", "--steps", "1", "--rounds", "1"]
    epoch_end = ["--epochs", "2", "--train", "10", "--test", "20", "--img-size", "32"]
    for script, argv, rows in (
        ("step.py", [*step, "--no-compile"], 5),
        ("epoch_end.py", [*epoch_end, "--eval-every", "2"], 4),
    ):
        stdout = run_benchmark(script, argv)
        tables = stdout.split("\n\n")
        table = [line for line in tables[1].splitlines() if line.startswith("| ")][1:]
        assert len(table) == rows, stdout
        ratios = [float(line.split("|")[-2 if script == "epoch_end.py" else 3]) for line in table]
        assert ratios[0] == 1.0 and all(r > 0 for r in ratios)
        if script == "step.py":
            last = tables[-1]
    # step.py's last table: ResNet-18's four stages at 32 px, each stage's stride-1 3x3 convs
    # on maps of 8x8 down to 1x1 and the next stage's shortcut and stride-2 3x3 conv, the
    # weight gradient timed both ways.
    convs = [line.split("|") for line in last.splitlines()[2:]]
    assert [c[1].strip() for c in convs] == [
        "3x3/1, 64, 64, 8x8", "1x1/2, 64, 128, 8x8", "3x3/2, 64, 128, 8x8",
        "3x3/1, 128, 128, 4x4", "1x1/2, 128, 256, 4x4", "3x3/2, 128, 256, 4x4",
        "3x3/1, 256, 256, 2x2", "1x1/2, 256, 512, 2x2", "3x3/2, 256, 512, 2x2",
        "3x3/1, 512, 512, 1x1",
    ]  # fmt: skip
    assert all(float(c[4]) > 0 for c in convs)


def test_candidates_benchmark_sets_each_candidate_beside_timm_on_validation(tmp_path, scenes):
    pytest.importorskip("timm", reason="the candidates are measured against timm's recipe")
    from rsscene.data.synthetic import generate

    other = tmp_path / "other"
    generate(other, per_class=10, size=40, seed=1)
    out = tmp_path / "select.json"
    argv = ["--data", str(scenes), str(other), "--candidates", "96px-27", "prog-64-28"]
    argv += ["--seeds", "2", "--epochs", "1", "--img-size", "32", "--workdir", str(tmp_path / "w")]
    stdout = run_benchmark("candidates.py", [*argv, "--json", str(out)])
    assert "test_acc" not in stdout and "test accuracy" not in stdout
    results = json.loads(out.read_text())
    assert set(results["repeats"]) == {"timm", "96px-27", "prog-64-28"}
    for by_data in results["repeats"].values():
        assert set(by_data) == {scenes.name, "other"}
        assert all(len(repeats) == 2 for repeats in by_data.values())  # two seeds each
        assert all(0 <= r["val_oa"] <= 1 for reps in by_data.values() for r in reps)
    for d in (scenes.name, "other"):
        rows = stdout.split(f"\n{d}\n\n")[1].splitlines()[2:5]
        timm = results["table"]["timm"][d]["mean"]
        assert rows[0].startswith("| timm train.py recipe |")
        for row in rows[1:]:
            cells = [c.strip() for c in row.split("|")[1:-1]]
            mean = float(cells[1].split(" ± ")[0])
            assert float(cells[3]) == pytest.approx(mean - timm, abs=0.11)  # the margin
    assert "best worst case within 0.5x timm's time on every set:" in stdout


def test_the_choice_is_the_best_worst_case_within_the_time_budget() -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from candidates import choose
    finally:
        sys.path.remove(str(BENCHMARKS))

    def row(mean: float, seconds: float) -> dict:
        return {"mean": mean, "std": 0.0, "seconds": seconds}

    table = {
        "timm": {"a": row(90, 100), "b": row(80, 100)},
        "96px-27": {"a": row(99, 40), "b": row(79, 40)},  # best mean, loses on b
        "112px-22": {"a": row(93, 45), "b": row(82, 45)},  # worst case +2
        "128px-55": {"a": row(95, 90), "b": row(86, 90)},  # best worst case, too slow
    }
    best, scores = choose(table, budget=0.5)
    assert best == "112px-22"
    assert scores["96px-27"]["worst_set"] == "b" and scores["96px-27"]["worst_margin"] == -1
    assert scores["128px-55"]["max_ratio"] == 0.9
    assert choose(table, budget=1.0)[0] == "128px-55"
    assert choose(table, budget=0.3)[0] is None
    # An equal worst case (to a tenth of a point) goes to the better mean, in either order.
    for order in (["prog-96-128-27", "prog-96-128-28"], ["prog-96-128-28", "prog-96-128-27"]):
        tie = {"timm": table["timm"]}
        rows = {"prog-96-128-27": row(95, 45), "prog-96-128-28": row(97, 48)}
        for name in order:
            tie[name] = {"a": rows[name], "b": row(82.04 if name.endswith("27") else 82, 45)}
        assert choose(tie, budget=0.5)[0] == "prog-96-128-28"


def test_peer_ratios_tabulates_the_default_against_timm(tmp_path: Path) -> None:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from peer_ratios import table
    finally:
        sys.path.remove(str(BENCHMARKS))

    def run(acc: float, wall: float) -> dict:
        return {"epochs": [{"test_acc": 0.5}, {"test_acc": acc}], "wall_seconds": wall}

    both = tmp_path / "peer-aid5.json"
    both.write_text(json.dumps({"timm": run(0.9, 40.0), "default": run(0.95, 10.0)}))
    alone = tmp_path / "peer-siri12.json"
    alone.write_text(json.dumps({"default": run(0.8, 10.0)}))  # timm did not finish
    lines = table([both, alone, tmp_path / "absent.json"]).splitlines()
    assert lines[2:] == ["| aid5 | 95.0% | 90.0% | - | 0.25 |"]
    assert "no peer run finished" in table([alone])


@pytest.mark.slow
def test_eurosat_region_maps_a_stac_item_as_its_patch_files(tmp_path):
    pytest.importorskip("rasterio", reason="the region is written as COGs (geo extra)")
    pytest.importorskip("pystac", reason="the region is a STAC item (geo extra)")
    data = shared_data("eurosat-ms")
    out = tmp_path / "r.json"
    tiny = ["--epochs", "1", "--img-size", "32", "--workdir", str(tmp_path / "w")]
    stdout = run_benchmark("eurosat_region.py", ["--data", str(data), *tiny, "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    # The item's 13 COGs at 10 m hold the patches' own pixels: the map reads each patch's
    # window as predict reads its file, to the class.
    assert rows["10m"]["agrees_with_files"] == 1.0
    assert rows["10m"]["accuracy"] == rows["files"]["accuracy"]
    assert rows["10m"]["summary"]["tiles"] == 50
    # At native resolution the 20 m and 60 m bands are other pixels: a map, with its own score.
    assert 0.0 <= rows["native"]["accuracy"] <= 1.0
    assert "| STAC item, 13 COGs at 10/20/60 m" in stdout
