"""results.png: grouped bars of each peer's speed per case, forward and backward panels."""

from __future__ import annotations

import math
from pathlib import Path

from flashsdpa.bench.report import case_label, grouped, peer_order

PANEL_HEIGHT_IN = 3.6
MODE_WORDS = {"fwd": "forward", "bwd": "backward"}


def panels(document: dict) -> list[tuple[str, list[dict], str, str]]:
    """(title, cases, mode, metric) for each panel, top to bottom."""
    result = []
    others = []  # the mask and fp32 cases share a panel: a few bars each
    for group, cases in grouped(document):
        ran = [c for c in cases if c.get("status") == "ran"]
        if group == "main":
            for dtype in dict.fromkeys(c["dtype"] for c in ran):
                subset = [c for c in ran if c["dtype"] == dtype]
                for mode in ("fwd", "bwd"):
                    if any(mode in c.get("modes", []) for c in subset):
                        result.append((f"main {dtype} {MODE_WORDS[mode]}", subset, mode, "tflops"))
        elif group == "decode":
            if ran:
                result.append(("decode forward: K+V read", ran, "fwd", "kv_tbps"))
        else:
            others += ran
    for mode in ("fwd", "bwd"):
        if any(mode in c.get("modes", []) for c in others):
            groups = " and ".join(dict.fromkeys(c["group"] for c in others))
            result.append((f"{groups} {MODE_WORDS[mode]}", others, mode, "tflops"))
    return result


def value(case: dict, peer: str, mode: str, metric: str) -> float:
    entry = case.get("peers", {}).get(peer, {}).get(mode, {})
    number = entry.get(metric) if entry.get("status") == "ok" else None
    return number if isinstance(number, (int, float)) and math.isfinite(number) else float("nan")


def write_plot(document: dict, path: Path) -> str | None:
    """Writes the PNG; returns None, or why no plot was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        return f"matplotlib is not installed ({error})"
    chosen = panels(document)
    if not chosen:
        return "no case ran"
    widest = max(len(cases) for _, cases, _, _ in chosen)
    figure, axes = plt.subplots(
        len(chosen), 1, figsize=(max(10.0, 0.55 * widest + 3), PANEL_HEIGHT_IN * len(chosen)), squeeze=False
    )
    colours = plt.get_cmap("tab10")
    all_peers = peer_order(document["cases"])
    for axis, (title, cases, mode, metric) in zip(axes[:, 0], chosen):
        peers = [p for p in peer_order(cases) if any(not math.isnan(value(c, p, mode, metric)) for c in cases)]
        width = 0.8 / max(1, len(peers))
        for index, peer in enumerate(peers):
            positions = [i + (index - (len(peers) - 1) / 2) * width for i in range(len(cases))]
            heights = [value(c, peer, mode, metric) for c in cases]
            axis.bar(positions, heights, width, label=peer, color=colours(all_peers.index(peer) % 10))
        axis.set_title(title, loc="left", fontsize=10)
        axis.set_ylabel("TB/s" if metric == "kv_tbps" else "TFLOP/s")
        axis.set_xticks(range(len(cases)))
        labels = [case_label(c) for c in cases]
        if title.startswith("main "):  # the dtype is in the title
            labels = [label.split(" ", 1)[1] for label in labels]
        axis.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    meta = document["meta"]
    figure.suptitle(
        f"flashsdpa bench on {meta.get('device_name')}, torch {meta.get('torch')}, {meta.get('date', '')[:10]}",
        fontsize=11,
    )
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.3 / (PANEL_HEIGHT_IN * len(chosen))))
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return None
