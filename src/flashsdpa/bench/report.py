"""Showing results: the terminal table (rich when installed), results.md, results.json, the summary.

The document written to results.json::

    {"schema": 1,
     "meta": {device, driver, versions, date, timing settings, conventions, args},
     "cases": [{name, group, shape fields, flops, status ("ran" / "skipped"),
                "peers": {peer: {"fwd": {"status": "ok", "ms", "tflops", "peak_mib", "vs_primary", ...}
                                 | {"status": "n/a", "reason"}, "bwd": ..., "first_call_s"}},
                "ratios": {peer: {mode: flashsdpa speed / peer speed}},
                "check": {"flashsdpa": {reference, max_rel_err, ok, rel_err_vs}}, ...}],
     "model": {...} (with --model)}
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from flashsdpa.bench.cases import KV_BYTES_GROUPS
from flashsdpa.bench.environment import headline

SCHEMA = 1
GROUP_ORDER = ("main", "mask", "fp32", "decode", "variant", "varlen", "paged", "prefill", "decode-graph", "cpu",
               "cpu-mask", "cpu-variant")
GROUP_TITLES = {
    "main": "TFLOP/s; 16384 tokens per batch (B = 16384 / L) and H = 2048 / d, unless shown",
    "mask": "TFLOP/s with attn_mask: bool key padding (B, 1, 1, S), last keys masked; float bias (1, H, L, S)",
    "fp32": "TFLOP/s, float32 inputs: flashsdpa precise (default) and fp32_precision='tf32'",
    "decode": "TB/s of K+V read; one query row, enable_gqa",
    "variant": "TFLOP/s of flashsdpa.attention's variants (window, softcap, sinks, ALiBi; top-left causal) and d=512; "
    "math runs them on materialised scores; FLOPs count visible pairs only",
    "varlen": "TFLOP/s on real tokens of a packed batch of mixed lengths, causal: flashsdpa.varlen_attn, torch's "
    "varlen_attn, SDPA padded to the longest sequence (pad and unpad timed)",
    "paged": "TB/s of K+V read; one query row per sequence; flashsdpa.kvcache_attention on a paged cache (shuffled "
    "pages), torch's SDPA on the same keys unpaged",
    "prefill": "TFLOP/s; chunked prefill: the new queries bottom-right causal over a paged cache (torch: unpaged, "
    "causal_lower_right)",
    "decode-graph": "TB/s of K+V read per call; the paged decode step (flashsdpa) and torch flash's unpaged one, "
    "called eagerly and replayed from a CUDA graph (-graph); 'host': the host's microseconds to return from one "
    "call or replay, made with the GPU idle (enqueue time; on a CPU the whole call)",
    "cpu": "TFLOP/s on a CPU, B=1, H=8; peak MiB a call adds",
    "cpu-mask": "TFLOP/s on a CPU with attn_mask: bool key padding (B, 1, 1, S), last S/8 keys masked; "
    "float bias (1, H, L, S); peak MiB a call adds",
    "cpu-variant": "TFLOP/s on a CPU of flashsdpa.attention's variants (window, softcap, sinks, ALiBi; causal); "
    "math runs them on materialised scores; FLOPs count visible pairs only; peak MiB a call adds",
}
PRIMARY = "flashsdpa"


# ---------------------------------------------------------------- JSON


def write_json(path: Path, document: dict) -> None:
    """Atomically, so a run killed mid-write leaves the previous complete file."""
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(document, indent=1, default=str) + "\n")
    os.replace(temporary, path)


def load_documents(paths: list[str]) -> dict:
    """Merge results.json files: later files win per case, except over a case they only skipped."""
    documents = [json.loads(Path(p).read_text()) for p in paths]
    merged = {"schema": SCHEMA, "meta": dict(documents[-1]["meta"]), "cases": [], "model": None}
    if len(documents) > 1:
        merged["meta"]["merged_from"] = [{"file": p, "date": d["meta"].get("date")} for p, d in zip(paths, documents)]
    by_name: dict[str, dict] = {}
    for document in documents:
        for case in document.get("cases", []):
            previous = by_name.get(case["name"])
            if previous is None or case.get("status") == "ran" or previous.get("status") != "ran":
                by_name[case["name"]] = case
        if document.get("model"):
            merged["model"] = document["model"]
    merged["cases"] = list(by_name.values())
    return merged


# ---------------------------------------------------------------- cells


def number(value: float | None) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "-"
    return f"{value:.3g}"


def metric_name(group: str) -> str:
    return "kv_tbps" if group in KV_BYTES_GROUPS else "tflops"


def peer_order(cases: list[dict]) -> list[str]:
    order = []
    for case in cases:
        for name in case.get("peers", {}):
            if name not in order:
                order.append(name)
    return sorted(order, key=lambda name: (name != PRIMARY, not name.startswith(PRIMARY)))


def case_label(case: dict) -> str:
    parts = [case["dtype"], f"d={case['head_dim']}"]
    if case["group"] in KV_BYTES_GROUPS or case["group"] == "prefill":
        if case["group"] == "prefill":
            parts.append(f"L={case['seq_q']}")
        parts += [f"S={case['seq_kv']}", f"B={case['batch']}", f"H={case['heads_q']}/{case['heads_kv']}"]
        if case.get("page_size"):
            parts.append(f"page={case['page_size']}")
        return " ".join(parts)
    if case["group"] == "varlen":
        parts += [f"B={case['batch']}", f"T={case.get('tokens')}", f"max={case['seq_kv']}", f"H={case['heads_q']}"]
        return " ".join(parts + (["causal"] if case.get("causal") else []))
    parts.append(f"L={case['seq_q']}" if case["seq_q"] == case["seq_kv"] else f"L={case['seq_q']} S={case['seq_kv']}")
    standard = (case["batch"], case["heads_q"]) == (16384 // case["seq_q"], 2048 // case["head_dim"])
    if case["group"] != "main" or not standard:
        parts.append(f"B={case['batch']} H={case['heads_q']}")
    if case.get("mask", "none") != "none":
        parts.insert(0, case["mask"].replace("_", "-"))
    if case.get("causal"):
        parts.append("causal")
    parts += case.get("variants", [])
    return " ".join(parts)


def cell(case: dict, peer: str, mode: str) -> str:
    entry = case.get("peers", {}).get(peer, {}).get(mode)
    if entry is None:
        return ""
    if entry.get("status") != "ok":
        return "n/a"
    text = number(entry.get(metric_name(case["group"])))
    ratio = case.get("ratios", {}).get(peer, {}).get(mode)
    spread = entry.get("vs_primary")
    if ratio and spread:
        text += f" ({ratio:.2f}x {spread['p25']:.2f}-{spread['p75']:.2f})"
    elif ratio:
        text += f" ({ratio:.2f}x)"
    if isinstance(entry.get("peak_mib"), (int, float)):
        text += f" {entry['peak_mib']:.3g} MiB"
    if isinstance(entry.get("host_us"), (int, float)):
        text += f" host {entry['host_us']:.3g} us"
    return text


def check_cell(case: dict, mode: str) -> str:
    entry = case.get("check", {}).get(PRIMARY)
    if not entry or entry.get("reference") is None:
        return ""
    errors = entry.get("rel_err_vs", {}).get(entry["reference"], {})
    keys = ["out"] if mode == "fwd" else [k for k in errors if k != "out"]
    values = [errors[k] for k in keys if k in errors]
    if not values:
        return ""
    numeric = [v if isinstance(v, (int, float)) else float("nan") for v in values]
    worst = max(numeric, key=lambda v: (math.isnan(v), v))
    ok = math.isfinite(worst) and worst <= entry["tolerance"]
    return f"{worst:.1e}" + ("" if ok else " FAIL")


def first_call_cell(case: dict, mode: str) -> str:
    seconds = case.get("peers", {}).get(PRIMARY, {}).get("first_call_s", {}).get(mode)
    return f"{seconds:.2f}" if isinstance(seconds, (int, float)) else ""


def group_rows(cases: list[dict], peers: list[str]) -> list[list[str]]:
    rows = []
    for case in cases:
        if case.get("status") != "ran":
            rows.append([case_label(case), "", f"skipped: {case.get('reason', '')}"] + [""] * (len(peers) + 1))
            continue
        for mode in case.get("modes", ["fwd"]):
            rows.append(
                [case_label(case), mode]
                + [cell(case, peer, mode) for peer in peers]
                + [check_cell(case, mode), first_call_cell(case, mode)]
            )
    return rows


def group_headers(peers: list[str]) -> list[str]:
    return ["case", "mode"] + peers + ["err vs ref", "1st call s"]


def grouped(document: dict) -> list[tuple[str, list[dict]]]:
    groups = []
    for group in GROUP_ORDER + tuple(sorted({c["group"] for c in document["cases"]} - set(GROUP_ORDER))):
        cases = [c for c in document["cases"] if c["group"] == group]
        if cases:
            groups.append((group, cases))
    return groups


def na_reasons(cases: list[dict]) -> list[str]:
    """Distinct n/a reasons per peer, with how many case/mode cells each explains."""
    counts: dict[tuple[str, str], int] = {}
    for case in cases:
        for peer, modes in case.get("peers", {}).items():
            for mode, entry in modes.items():
                if isinstance(entry, dict) and entry.get("status") == "n/a":
                    key = (peer, entry.get("reason", ""))
                    counts[key] = counts.get(key, 0) + 1
    return [f"{peer}: {reason} ({n}x)" for (peer, reason), n in counts.items()]


LEGEND = (
    "Peers: torch = torch SDPA as it chooses; cudnn, flash, efficient, math = torch SDPA pinned to "
    "CUDNN_ATTENTION, FLASH_ATTENTION, EFFICIENT_ATTENTION, MATH (sdpa_kernel); flex = compiled FlexAttention. "
    "Cells: the peer's TFLOP/s (decode: TB/s of K+V read), in brackets flashsdpa's speed over the peer's "
    "(> 1: flashsdpa faster; the peers are timed interleaved, round by round on the same inputs: the median "
    "of the per-round ratios, then their interquartile range), then the peak MiB one call adds (fwd: a "
    "forward; bwd: a forward and its backward). FLOPs: 4*B*H*L*S*d forward (causal: visible pairs only), backward 2.5x, timed alone. "
    "'err vs ref': flashsdpa's relative error against the first of cudnn/flash/efficient/math/flex, for the "
    "variants against their float64 formula (fwd: "
    "output; bwd: worst gradient). '1st call s': flashsdpa's first call, JIT included."
)


FLEX_COMPILES = {
    "static": "torch.compile(flex_attention, dynamic=False), compiled per shape",
    "dynamic": "torch.compile(flex_attention, dynamic=True), symbolic sizes",
    "off": "off",
}


def settings_line(meta: dict) -> str:
    timing = meta.get("timing", {})
    text = (
        f"Timing: the peers of a case interleaved, {timing.get('min_reps')}-{timing.get('max_reps')} rounds "
        f"({timing.get('rep_ms')} ms of flashsdpa's calls) after {timing.get('warmup_ms')} ms of warm-up; a peer "
        "over 4x slower runs fewer; medians"
    )
    if timing.get("flush_bytes"):
        text += f", {timing['flush_bytes'] >> 20} MiB L2 flush before each run"
    if meta.get("flex_compile"):
        text += f". FlexAttention: {FLEX_COMPILES.get(meta['flex_compile'], meta['flex_compile'])}"
    return text + "."


# ---------------------------------------------------------------- text


def markdown(document: dict) -> str:
    meta = document["meta"]
    lines = [f"# flashsdpa bench: {headline(meta)}", "", LEGEND, "", settings_line(meta), ""]
    for group, cases in grouped(document):
        peers = peer_order(cases)
        headers = group_headers(peers)
        lines += [f"## {group}: {GROUP_TITLES.get(group, '')}", ""]
        lines.append("| " + " | ".join(headers) + " |")
        lines.append("| " + " | ".join("---" for _ in headers) + " |")
        for row in group_rows(cases, peers):
            lines.append("| " + " | ".join(row) + " |")
        reasons = na_reasons(cases)
        if reasons:
            lines += ["", "n/a:"] + [f"- {r}" for r in reasons]
        lines.append("")
    if document.get("model"):
        lines += ["## model", "", "```", json.dumps(document["model"], indent=1, default=str), "```", ""]
    lines += ["## summary", ""] + summary_lines(document) + [""]
    return "\n".join(lines)


def plain_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(out)


def print_tables(document: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        Console = None
    meta = document["meta"]
    if Console is not None:
        console = Console(width=None if os.isatty(1) else 220)
        console.print(f"[bold]flashsdpa bench[/bold]: {headline(meta)}")
        console.print(LEGEND + " " + settings_line(meta), style="dim")
    else:
        print(f"flashsdpa bench: {headline(meta)}\n{LEGEND} {settings_line(meta)}")
    for group, cases in grouped(document):
        peers = peer_order(cases)
        headers, rows = group_headers(peers), group_rows(cases, peers)
        title = f"{group}: {GROUP_TITLES.get(group, '')}"
        if Console is not None:
            table = Table(title=title, title_justify="left")
            for index, header in enumerate(headers):
                table.add_column(header, justify="left" if index < 2 else "right", no_wrap=index < 2)
            for row in rows:
                table.add_row(*row, style="red" if "FAIL" in row[-2] else None)
            console.print(table)
        else:
            print(f"\n{title}\n{plain_table(headers, rows)}")
        for reason in na_reasons(cases):
            print(f"  n/a {reason}")
    if document.get("model"):
        print("\nmodel:")
        for key, value in document["model"].items():
            print(f"  {key}: {value}")


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summary_lines(document: dict) -> list[str]:
    lines = [
        "flashsdpa speed over each peer, geometric mean over the cases both ran (cases), "
        "then the lowest case's ratio with its interquartile range over the rounds:"
    ]
    for group, cases in grouped(document):
        for mode in ("fwd", "bwd"):
            parts = []
            for peer in peer_order(cases):
                ran = [c for c in cases if c.get("ratios", {}).get(peer, {}).get(mode)]
                if not ran:
                    continue
                values = [c["ratios"][peer][mode] for c in ran]
                text = f"{peer} {geometric_mean(values):.2f}x ({len(values)})"
                low = min(ran, key=lambda c: c["ratios"][peer][mode])
                spread = low["peers"][peer][mode].get("vs_primary")
                text += f", lowest {low['ratios'][peer][mode]:.2f}x"
                if spread:
                    text += f" [{spread['p25']:.2f}-{spread['p75']:.2f}]"
                parts.append(text + f" {case_label(low)}")
            if parts:
                lines.append(f"  {group} {mode}: " + "; ".join(parts))
    memory = memory_lines(document)
    if memory:
        lines += ["flashsdpa's peak added memory over each peer's, geometric mean (cases; < 1: flashsdpa less):"]
        lines += memory
    verdicts = [c["check"][name] for c in document["cases"] for name in c.get("check", {}) if "ok" in c["check"][name]]
    failed = [v for v in verdicts if not v["ok"]]
    agreeing = len(verdicts) - len(failed)
    lines.append(f"flashsdpa agrees with its reference peer on {agreeing} of {len(verdicts)} checked case(s)")
    missing = [c["name"] for c in document["cases"] if c.get("status") == "ran"
               and c["peers"].get(PRIMARY, {}).get("fwd", {}).get("status") == "n/a"]
    if missing:
        lines.append(f"flashsdpa n/a on {len(missing)} case(s): {', '.join(missing)}")
    skipped = [c["name"] for c in document["cases"] if c.get("status") == "skipped"]
    if skipped:
        patterns = ",".join(compress_names(skipped, [c["name"] for c in document["cases"]]))
        lines.append(f"skipped for time: {len(skipped)} case(s); run them with --cases {patterns}")
    return lines


def peak_mib(case: dict, peer: str, mode: str) -> float | None:
    entry = case.get("peers", {}).get(peer, {}).get(mode, {})
    value = entry.get("peak_mib") if entry.get("status") == "ok" else None
    return value if isinstance(value, (int, float)) and value > 0 else None


def memory_lines(document: dict) -> list[str]:
    lines = []
    for group, cases in grouped(document):
        for mode in ("fwd", "bwd"):
            parts = []
            for peer in peer_order(cases)[1:]:
                pairs = [(peak_mib(c, PRIMARY, mode), peak_mib(c, peer, mode)) for c in cases]
                values = [mine / theirs for mine, theirs in pairs if mine and theirs]
                if values:
                    parts.append(f"{peer} {geometric_mean(values):.2f}x ({len(values)})")
            if parts:
                lines.append(f"  {group} {mode}: " + ", ".join(parts))
    return lines


def compress_names(selected: list[str], every: list[str]) -> list[str]:
    """Case names as short --cases patterns: 'main/fp16-' when every such case is selected."""
    patterns, covered = [], set()
    for name in selected:
        if name in covered:
            continue
        prefix = name.split("-", 1)[0] + "-"  # e.g. 'main/fp16-'
        family = [n for n in every if n.startswith(prefix)]
        if all(n in selected for n in family):
            patterns.append(prefix)
            covered.update(family)
        else:
            patterns.append(name)
            covered.add(name)
    return patterns


def failures(document: dict) -> list[str]:
    """Cases where flashsdpa failed to run or disagreed with its reference."""
    names = []
    for case in document["cases"]:
        if case.get("status") != "ran":
            continue
        entry = case.get("check", {}).get(PRIMARY, {})
        primary = case["peers"].get(PRIMARY, {})
        ran = all(primary.get(mode, {}).get("status") == "ok" for mode in case.get("modes", ["fwd"]))
        if not ran or entry.get("ok") is False:
            names.append(case["name"])
    return names
