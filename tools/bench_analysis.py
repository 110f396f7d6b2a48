#!/usr/bin/env python
"""How long the channel-group analysis takes on big graphs (issue 4 benchmark, not a test).

For every model: export it once with ``torch.onnx.export(dynamo=True)`` (cached under
``--cache``; random init, the analysis only reads the graph and the initializer shapes), load it
with :func:`foldonnx.onnx_file.load_model`, then time :func:`find_channel_groups` ``--repeat``
times in one process and report the median, min and max, the graph size and the groups found.
Writes ``benchmarks/analysis.json`` and ``benchmarks/analysis.md`` (merging with the models
already there that were not run this time). What cannot be built is recorded with its reason.

    .venv/bin/python tools/bench_analysis.py --models vit_base,vit_large
    .venv/bin/python tools/bench_analysis.py --models sam_vit_h      # ~2.5 GB of weights

Targets: ViT-B/16 < 2 s, SAM ViT-H encoder (1024 px) < 30 s on the 2-core CPU machines.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench_analysis")

MODELS: dict[str, dict[str, Any]] = {
    "vit_base": {
        "timm": "vit_base_patch16_224",
        "size": 224,
        "target_s": 2.0,
        "label": "timm vit_base_patch16_224 (ViT-B/16)",
    },
    "vit_large": {
        "timm": "vit_large_patch16_224",
        "size": 224,
        "target_s": 30.0,
        "label": "timm vit_large_patch16_224 (ViT-L/16)",
    },
    "sam_vit_b": {
        "sam": "vit_b",
        "size": 1024,
        "target_s": 30.0,
        "label": "SAM ViT-B image encoder, 1024 px",
    },
    "sam_vit_h": {
        "sam": "vit_h",
        "size": 1024,
        "target_s": 30.0,
        "label": "SAM ViT-H image encoder, 1024 px",
    },
}


def _peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _watch_memory(limit_gb: float, on_exceed: Callable[[float], None]) -> None:
    """Abort the process (after ``on_exceed``) when its resident memory passes ``limit_gb``:
    the machine is shared, and an export of a multi-GB model must not push others out."""
    import psutil

    proc = psutil.Process()

    def watch() -> None:
        while True:
            rss = proc.memory_info().rss / 2**30
            if rss > limit_gb:
                on_exceed(rss)
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()


def export(name: str, cache: Path) -> tuple[Path, float]:
    """Export *name* once (cached); returns the path and the export time (0 when cached)."""
    spec = MODELS[name]
    path = cache / f"{name}.onnx"
    if path.exists():
        return path, 0.0
    import torch

    t0 = time.perf_counter()
    if "timm" in spec:
        import timm

        model = timm.create_model(spec["timm"], pretrained=False)
    else:
        from segment_anything import sam_model_registry

        model = sam_model_registry[spec["sam"]](checkpoint=None).image_encoder
    model.eval()
    x = torch.randn(1, 3, spec["size"], spec["size"])
    big = sum(p.numel() for p in model.parameters()) * 4 > 1.8 * 2**30
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=18, external_data=big)
    del model
    return path, time.perf_counter() - t0


def measure(name: str, cache: Path, repeat: int) -> dict[str, Any]:
    import onnx

    from foldonnx.analysis import find_channel_groups, summarize_groups
    from foldonnx.graph.stats import count_params
    from foldonnx.onnx_file import load_model

    spec = MODELS[name]
    row: dict[str, Any] = {"model": name, "label": spec["label"], "target_s": spec["target_s"]}
    path, export_s = export(name, cache)
    row["export_s"] = round(export_s, 1) if export_s else "cached"
    t0 = time.perf_counter()
    loaded = load_model(path)
    row["load_s"] = round(time.perf_counter() - t0, 2)
    model: onnx.ModelProto = loaded.model
    row["nodes"] = len(model.graph.node)
    row["initializers"] = len(model.graph.initializer)
    row["params"] = count_params(model)
    row["file_bytes"] = loaded.file_size
    times = []
    groups = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        groups = find_channel_groups(model)
        times.append(time.perf_counter() - t0)
    row["analysis_s"] = {
        "median": round(statistics.median(times), 3),
        "min": round(min(times), 3),
        "max": round(max(times), 3),
        "runs": len(times),
    }
    row["meets_target"] = statistics.median(times) < spec["target_s"]
    row["groups"] = dict(
        Counter(
            f"{g.kind.value} {g.channels}x{g.unit}" if g.unit > 1 else f"{g.kind.value} {g.channels}"
            for g in groups
        )
    )
    summary = summarize_groups(groups, model)
    row["foldable_groups"] = f"{summary['foldable_groups']} / {summary['groups']}"
    row["blocked"] = sorted({f"{g.name}: {g.blocked}" for g in groups if not g.foldable})[:5]
    row["peak_rss_gb"] = round(_peak_rss_gb(), 2)  # includes the export when it ran here
    if export_s:
        row["export"] = f"{export_s:.0f} s, peak {row['peak_rss_gb']:.1f} GB resident"
    return row


def write(rows: dict[str, dict[str, Any]], out: Path) -> None:
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "note": "analysis time = find_channel_groups(model) on a loaded ModelProto (shape inference on a "
        "weight-free copy + propagation + group building); export and load are reported separately",
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    lines = [
        "# Channel-group analysis speed",
        "",
        f"{meta['date']} on {meta['machine']}. Written by `tools/bench_analysis.py`; {meta['note']}.",
        "",
        "| model | nodes | params | analysis s (median, min-max) | target | load s | groups (foldable) "
        "| export |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows.values():
        if "error" in r:
            lines.append(f"| {r['label']} | - | - | failed: {r['error']} | < {r['target_s']} s | - | - |")
            continue
        a = r["analysis_s"]
        ok = "met" if r["meets_target"] else "MISSED"
        lines.append(
            f"| {r['label']} | {r['nodes']} | {r['params'] / 1e6:.1f}M | "
            f"{a['median']} ({a['min']}-{a['max']}) | < {r['target_s']} s: {ok} | {r['load_s']} | "
            f"{r['foldable_groups']} | {r.get('export', 'cached (cost not recorded)')} |"
        )
    lines += ["", "Groups found:", ""]
    for r in rows.values():
        if "groups" in r:
            kinds = ", ".join(f"{k}: {v}" for k, v in r["groups"].items())
            lines.append(f"- **{r['model']}**: {kinds}")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="vit_base,vit_large", help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--cache", default="/tmp/foldonnx-bench-analysis", help="where exported models are kept")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "analysis"), help="output path without suffix")
    p.add_argument(
        "--max-rss-gb", type=float, default=10.0, help="abort (and record why) above this resident memory"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict[str, Any]] = {}
    if out.with_suffix(".json").exists():
        rows = json.loads(out.with_suffix(".json").read_text()).get("results", {})
    current: list[str] = []

    def exceeded(rss: float) -> None:
        name = current[-1] if current else "?"
        logger.error("%s: resident memory %.1f GB > --max-rss-gb %.1f: aborting", name, rss, args.max_rss_gb)
        rows[name] = {
            "model": name,
            "label": MODELS[name]["label"],
            "target_s": MODELS[name]["target_s"],
            "error": f"aborted: export needed more than {args.max_rss_gb:.0f} GB of memory on this "
            "shared machine",
        }
        write(rows, out)

    _watch_memory(args.max_rss_gb, exceeded)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            p.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
        current.append(name)
        logger.info("== %s", name)
        previous = rows.get(name, {})
        try:
            rows[name] = measure(name, cache, args.repeat)
            if rows[name]["export_s"] == "cached" and "export" in previous:
                rows[name]["export"] = previous["export"]  # keep what the export cost when it ran
        except Exception as exc:  # noqa: BLE001 - record why, never estimate
            logger.error("%s failed: %s", name, traceback.format_exc(limit=3))
            rows[name] = {
                "model": name,
                "label": MODELS[name]["label"],
                "target_s": MODELS[name]["target_s"],
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
            }
        logger.info("%s", json.dumps(rows[name]))
        write(rows, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
