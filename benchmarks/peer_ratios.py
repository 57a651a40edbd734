"""The default recipe against timm's, from peer.py's --json files: one row per data set.

python benchmarks/peer_ratios.py peer-aid5.json peer-siri12.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(paths: list[Path]) -> str:
    """A Markdown table: final test accuracy of each recipe and the whole-run time ratio."""
    lines = [
        "| set | default | timm | tutorial | default's time / timm's |",
        "|---|---:|---:|---:|---:|",
    ]
    for path in paths:
        if not path.is_file():
            continue
        runs = json.loads(path.read_text())
        if not {"timm", "default"} <= set(runs):
            continue
        acc = {name: f"{100 * r['epochs'][-1]['test_acc']:.1f}%" for name, r in runs.items()}
        ratio = runs["default"]["wall_seconds"] / runs["timm"]["wall_seconds"]
        name = path.stem.removeprefix("peer-")
        lines.append(
            f"| {name} | {acc['default']} | {acc['timm']} | {acc.get('tutorial', '-')}"
            f" | {ratio:.2f} |"
        )
    if len(lines) == 2:
        lines.append("| (no peer run finished) | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n## the default against timm's recipe (whole run)\n")
    print(table([Path(p) for p in sys.argv[1:]]))
