"""Benchmark of ``compress --auto``: the searched mix against every single method, naive fixed
mixes and the most used peer (Torch-Pruning 1.6.1), on real models and real photos.

    python tools/bench_auto.py dinov2      # DINOv2-S at 10/20/30/40 % of the parameters
    python tools/bench_auto.py quantize    # DINOv2-S: auto + dynamic INT8; --target-latency 0.7
    python tools/bench_auto.py datafree    # DINOv2-S at 20 %, calibrated on synthetic images only
    python tools/bench_auto.py peer        # Torch-Pruning (magnitude, no fine-tuning) on the same DINOv2-S
    python tools/bench_auto.py effnet      # EfficientNet-Lite0 at 20 %: top-1 agreement and accuracy
    python tools/bench_auto.py minilm      # MiniLM-L6 at 20 %: sentence-embedding cosine
    python tools/bench_auto.py report      # benchmarks/auto.md from benchmarks/auto.json

Every run merges its rows into ``benchmarks/auto.json`` and rewrites ``benchmarks/auto.md``.

DINOv2-S is the real backbone (``last_hidden_state`` [B, 257, 384]). Every method gets the same
calibration set (CALIB: crops of the CIFAR photos and Fashion-MNIST plus synthetic noise images,
nothing in common with the evaluation photos); ``auto`` splits it into a fitting and a held-out
part itself. Evaluation: the 20 foolbox ImageNet photos and the 21 scikit-image photos, never
used to fit or choose: cosine of the CLS token and of the patch tokens to the original. Latency:
batch 1 on the CPU, every variant interleaved with the original in one process
(``foldonnx.runtime.bench``), as a ratio to the original's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks"
CACHE = Path(os.environ.get("FOLDONNX_BENCH_CACHE", "/tmp/foldonnx-bench-auto"))
CALIB = "offdomain:128+synthetic:128"
TARGETS = (0.1, 0.2, 0.3, 0.4)
BUDGET_MINUTES = 20.0
PEER = "Torch-Pruning 1.6.1 (best of 8 variants on the eval photos)"
SINGLES = {
    "fold + data repair": ("fold", {"repair": "data"}),
    "prune-l1 + data repair": ("prune-l1", {"repair": "data"}),
    "blocks": ("blocks", {}),
    "lowrank": ("lowrank", {}),
}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export_cached(name: str, file: str, **kw: Any) -> Path:
    from foldonnx.exporter.export import export_model

    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / file
    if not out.exists():
        export_model(name, out, **kw)
    return out


def _save(model: Any, name: str) -> Path:
    from foldonnx.onnx_file import save_model

    path = CACHE / f"{name}.onnx"
    save_model(model, path)
    return path


def _evaluator(model_path: Path, sources: tuple[str, ...] = ("imagenet20", "photos")) -> Any:
    """Reference outputs on the evaluation data, computed once."""
    from foldonnx.data.feeds import model_feeds
    from foldonnx.evaluate.evaluation import Evaluator
    from foldonnx.evaluate.runner import ModelInputs
    from foldonnx.onnx_file import load_model

    model = load_model(model_path).model
    parts, labels = [], []
    for src in sources:
        feeds, lab = model_feeds(model, src)
        parts.append(feeds)
        labels.append(lab)
    feeds = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    lab = np.concatenate(labels) if all(x is not None for x in labels) else None
    return Evaluator(model_path, ModelInputs(feeds, lab, "+".join(sources)), progress=False)


def _mix(model: Any, steps: list[tuple[str, dict[str, Any], float]], calib: str) -> tuple[Any, dict]:
    """A fixed recipe whose step shares are fractions of the *original* parameters."""
    from foldonnx.passes.base import PassContext
    from foldonnx.passes.registry import make_pass

    ctx = PassContext(calib=calib)
    p0 = ctx.stats(model).params
    current, removed, cum, recipe = model, 0, 0.0, []
    for name, opts, share in steps:
        cum += share
        now = ctx.stats(current).params
        frac = min(max(cum * p0 - removed, 0) / now, 0.95)
        res = make_pass(name, {**opts, "target_params": frac}).run(current, ctx)
        current = res.model
        removed = p0 - ctx.stats(current).params
        recipe.append({name: res.report.config})
    return current, {"recipe": recipe}


def _auto(model: Any, calib: str, budget: float, **kw: Any) -> tuple[Any, dict]:
    import foldonnx

    t0 = time.perf_counter()
    m, rep = foldonnx.compress(model, auto=True, calib=calib, budget_minutes=budget, **kw)
    a = rep.steps[0]
    chosen = next(c for c in a.candidates if c.chosen)
    return m, {
        "recipe": a.recipe,
        "chosen": chosen.label,
        "candidates": len(a.candidates),
        "search_minutes": round(a.search_seconds / 60, 2),
        "held_out_score": chosen.score,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _row(model0: Any, model: Any, path: Path, ev: Any, extra: dict) -> dict:
    from foldonnx.graph.stats import model_stats

    s0, s1 = model_stats(model0), model_stats(model)
    cand = ev.evaluate(str(path), name=path.stem)
    return {
        "params_removed": round(1 - s1.params / s0.params, 4),
        "macs_removed": round(1 - s1.macs / s0.macs, 4),
        "bytes": path.stat().st_size,
        "metrics": {k: round(v, 4) for k, v in cand.metrics.items()},
        "accuracy": cand.accuracy,
        "path": str(path),
        **extra,
    }


def _latencies(rows: list[dict], original: Path, iters: int = 20) -> None:
    from foldonnx.runtime import bench

    paths = [original] + [Path(r["path"]) for r in rows]
    res = bench([str(p) for p in paths], provider="cpu", batches=[1], warmup=3, iters=iters)
    for r, b in zip(rows, res[1:], strict=True):
        r["latency_ratio"] = round(b.latency_ratio, 4) if b.ok and b.latency_ratio is not None else None


# ------------------------------------------------------------------------------ DINOv2-S
def _dinov2() -> tuple[Path, Any]:
    from foldonnx.onnx_file import load_model

    path = export_cached("dinov2_s_backbone", "dinov2_s_backbone.onnx")
    return path, load_model(path).model


def bench_dinov2(
    targets=TARGETS, calib: str = CALIB, budget: float = BUDGET_MINUTES, skip: frozenset[str] = frozenset()
) -> list[dict]:
    path, model = _dinov2()
    ev = _evaluator(path)
    rows = []
    for t in targets:
        variants: list[tuple[str, Any]] = []
        for label, (name, opts) in SINGLES.items():
            if label in skip:
                continue
            variants.append((label, lambda name=name, opts=opts, t=t: _mix(model, [(name, opts, t)], calib)))
        if t >= 0.2:
            variants.append(
                (
                    f"naive: fold 10 % + lowrank to {t:.0%}",
                    lambda t=t: _mix(
                        model, [("fold", {"repair": "data"}, 0.1), ("lowrank", {}, t - 0.1)], calib
                    ),
                )
            )
        if t >= 0.3:
            variants.append(
                (
                    "naive: 2 blocks + lowrank",
                    lambda t=t: _mix(model, [("blocks", {}, 0.15), ("lowrank", {}, t - 0.15)], calib),
                )
            )
        variants.append(("auto", lambda t=t: _auto(model, calib, budget, target_params=t)))
        for label, make in variants:
            _log(f"DINOv2-S {t:.0%}: {label}")
            t0 = time.perf_counter()
            m, extra = make()
            extra.setdefault("seconds", round(time.perf_counter() - t0, 1))
            slug = "".join(ch if ch.isalnum() else "_" for ch in label)
            name = f"dinov2_{slug}_{t:g}"
            row = _row(
                model, m, _save(m, name), ev, {"model": "DINOv2-S", "target": t, "method": label, **extra}
            )
            _log(f"  -> {row['params_removed']:.3f} params removed, CLS {row['metrics'].get('cls_cosine')}")
            rows.append(row)
            write({"dinov2": rows}, merge_rows=True)
    _latencies(rows, path)
    write({"dinov2": rows}, merge_rows=True)
    return rows


def bench_quantize(calib: str = CALIB, budget: float = BUDGET_MINUTES, targets=(0.2, 0.3)) -> list[dict]:
    from foldonnx.passes.base import PassContext
    from foldonnx.passes.registry import make_pass

    path, model = _dinov2()
    ev = _evaluator(path)
    rows = []
    q = make_pass("quantize", {"mode": "dynamic"}).run(model, PassContext()).model
    rows.append(
        _row(model, q, _save(q, "dinov2_int8"), ev, {"model": "DINOv2-S", "method": "dynamic INT8 alone"})
    )
    for t in targets:
        m, extra = _auto(model, calib, budget, target_params=t, quantize="dynamic")
        rows.append(
            _row(
                model,
                m,
                _save(m, f"dinov2_auto_int8_{t:g}"),
                ev,
                {"model": "DINOv2-S", "target": t, "method": "auto + dynamic INT8", **extra},
            )
        )
        write({"quantize": rows}, merge_rows=True)
    m, extra = _auto(model, calib, budget, target_latency=0.7)
    rows.append(
        _row(
            model,
            m,
            _save(m, "dinov2_auto_latency_0.7"),
            ev,
            {"model": "DINOv2-S", "target_latency": 0.7, "method": "auto --target-latency 0.7", **extra},
        )
    )
    _latencies(rows, path, iters=30)
    write({"quantize": rows}, merge_rows=True)
    return rows


def bench_datafree(budget: float = BUDGET_MINUTES) -> list[dict]:
    path, model = _dinov2()
    ev = _evaluator(path)
    rows = []
    for label, make in (
        ("fold + ar (data-free)", lambda: _mix(model, [("fold", {"repair": "ar"}, 0.2)], "synthetic:256")),
        ("lowrank on synthetic", lambda: _mix(model, [("lowrank", {}, 0.2)], "synthetic:256")),
        ("auto on synthetic", lambda: _auto(model, "synthetic:256", budget, target_params=0.2)),
    ):
        t0 = time.perf_counter()
        m, extra = make()
        extra.setdefault("seconds", round(time.perf_counter() - t0, 1))
        rows.append(
            _row(
                model,
                m,
                _save(m, f"dinov2_df_{label.split()[0]}"),
                ev,
                {"model": "DINOv2-S", "target": 0.2, "method": label, **extra},
            )
        )
        write({"datafree": rows}, merge_rows=True)
    return rows


def bench_peer(targets=TARGETS) -> list[dict]:
    """Torch-Pruning 1.6.1 (magnitude importance, no fine-tuning; ``tools/peer_torch_pruning.py``)
    on the same DINOv2-S, scored by the same evaluator: the best of its 8 variants per target.
    The choice sees the evaluation photos, so its row is an upper bound for the peer."""
    sys.path.insert(0, str(ROOT / "tools"))
    import peer_torch_pruning as peer

    path, model = _dinov2()
    ev = _evaluator(path)
    torch_model = peer.load_timm_dinov2_from_onnx(path)
    rows = []
    for t in targets:
        _log(f"DINOv2-S {t:.0%}: Torch-Pruning, 8 variants")
        found = peer.best_of(torch_model, t, ev, CACHE, prefix="dinov2_tp")
        if found.best is None:
            rows.append({"model": "DINOv2-S", "target": t, "method": PEER, "error": "no variant reached it"})
            continue
        b = found.best
        rows.append(
            {
                "model": "DINOv2-S",
                "target": t,
                "method": PEER,
                "params_removed": b["onnx_params_removed"],
                "macs_removed": b["macs_removed"],
                "bytes": b["bytes"],
                "metrics": b["metrics"],
                "accuracy": None,
                "path": b["path"],
                "chosen": b["variant"],
                "seconds": round(sum(r["total_seconds"] for r in found.rows), 1),
            }
        )
        _log(f"  -> {b['onnx_params_removed']:.3f} params removed, CLS {b['metrics'].get('cls_cosine')}")
        write({"dinov2": rows}, merge_rows=True)
    _latencies([r for r in rows if "path" in r], path)
    write({"dinov2": rows}, merge_rows=True)
    return rows


# ------------------------------------------------------------------------------ other models
def bench_effnet(budget: float = BUDGET_MINUTES) -> list[dict]:
    from foldonnx.onnx_file import load_model

    path = export_cached("efficientnet_lite0", "efficientnet_lite0.onnx")
    model = load_model(path).model
    ev = _evaluator(path, ("imagenet20",))
    calib = "offdomain:128"
    rows = []
    for label, make in (
        ("fold + data repair", lambda: _mix(model, [("fold", {"repair": "data"}, 0.2)], calib)),
        ("prune-l1 + data repair", lambda: _mix(model, [("prune-l1", {"repair": "data"}, 0.2)], calib)),
        ("lowrank", lambda: _mix(model, [("lowrank", {}, 0.2)], calib)),
        ("auto", lambda: _auto(model, calib, budget, target_params=0.2, methods="fold,prune,lowrank")),
    ):
        t0 = time.perf_counter()
        m, extra = make()
        extra.setdefault("seconds", round(time.perf_counter() - t0, 1))
        rows.append(
            _row(
                model,
                m,
                _save(m, f"lite0_{label.split()[0]}"),
                ev,
                {"model": "EfficientNet-Lite0", "target": 0.2, "method": label, **extra},
            )
        )
        write({"effnet": rows}, merge_rows=True)
    _latencies(rows, path)
    write({"effnet": rows}, merge_rows=True)
    return rows


def bench_minilm(budget: float = BUDGET_MINUTES) -> list[dict]:
    from foldonnx.onnx_file import load_model

    path = export_cached("minilm_l6", "minilm_l6.onnx")
    model = load_model(path).model
    ev = _evaluator(path, ("sentences:test",))
    calib = "sentences:train:256"
    rows = []
    for label, make in (
        ("fold + data repair", lambda: _mix(model, [("fold", {"repair": "data"}, 0.2)], calib)),
        ("blocks", lambda: _mix(model, [("blocks", {}, 0.2)], calib)),
        ("lowrank", lambda: _mix(model, [("lowrank", {}, 0.2)], calib)),
        ("auto", lambda: _auto(model, calib, budget, target_params=0.2)),
    ):
        t0 = time.perf_counter()
        try:
            m, extra = make()
        except Exception as exc:  # noqa: BLE001 - a method that refuses this model is a row too
            rows.append({"model": "MiniLM-L6", "target": 0.2, "method": label, "error": str(exc)})
            continue
        extra.setdefault("seconds", round(time.perf_counter() - t0, 1))
        rows.append(
            _row(
                model,
                m,
                _save(m, f"minilm_{label.split()[0]}"),
                ev,
                {"model": "MiniLM-L6", "target": 0.2, "method": label, **extra},
            )
        )
        write({"minilm": rows}, merge_rows=True)
    return rows


# ------------------------------------------------------------------------------ output
def _meta() -> dict:
    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        git = ""
    import onnxruntime

    return {
        "command": "python tools/bench_auto.py " + " ".join(sys.argv[1:]),
        "git": git,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "onnxruntime": onnxruntime.__version__,
        "calibration": CALIB,
        "date": time.strftime("%Y-%m-%d"),
    }


def write(results: dict, merge_rows: bool = False) -> None:
    path = OUT / "auto.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, rows in results.items():
        if merge_rows:
            old = {
                (r.get("model"), r.get("method"), r.get("target"), r.get("target_latency")): r
                for r in data.get(key, [])
            }
            for r in rows:
                old[(r.get("model"), r.get("method"), r.get("target"), r.get("target_latency"))] = r
            data[key] = list(old.values())
        else:
            data[key] = rows
    data["meta"] = _meta()
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    write_markdown(data)


def _f(x: Any, spec: str = ".3f") -> str:
    return "–" if x is None else format(x, spec)


def write_markdown(d: dict) -> None:
    meta = d.get("meta", {})
    lines = [
        "# `compress --auto` against single methods, fixed mixes and Torch-Pruning",
        "",
        f"Generated by `{meta.get('command', 'python tools/bench_auto.py')}` (git {meta.get('git', '?')}, "
        f"{meta.get('date', '')}), on {meta.get('machine', '?')}, "
        f"ONNX Runtime {meta.get('onnxruntime', '?')}; "
        "never edited by hand. Calibration for every DINOv2-S method (but the data-free section): "
        f"`{meta.get('calibration', CALIB)}` (auto holds a quarter of it out to score candidates); "
        "evaluation on the 20 foolbox ImageNet photos + 21 scikit-image photos, never used to fit or "
        "choose. Latency: batch 1, CPU, interleaved with the original; < 1 is faster.",
        "",
    ]
    if d.get("dinov2"):
        lines += [
            "## DINOv2-S: CLS cosine to the original at matched parameter counts",
            "",
            "| target | method | params removed | MACs removed | CLS cos | patch cos | latency "
            "| recipe chosen / time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(d["dinov2"], key=lambda r: (r.get("target") or 0, r.get("method", ""))):
            m = r.get("metrics", {})
            how = r.get("chosen") or (f"{r.get('variant')}" if r.get("variant") else "")
            t = f"{r.get('seconds', 0):.0f} s"
            lines.append(
                f"| {r.get('target', 0):.0%} | {r['method']} | {_f(r.get('params_removed'))} | "
                f"{_f(r.get('macs_removed'))} | {_f(m.get('cls_cosine'))} | {_f(m.get('patch_cosine'))} | "
                f"{_f(r.get('latency_ratio'))} | {how} {t} |"
            )
        lines.append("")
    for key, title, metric in (
        ("quantize", "DINOv2-S with dynamic INT8 and a latency target", "cls_cosine"),
        ("datafree", "DINOv2-S at 20 %, data-free (synthetic calibration images only)", "cls_cosine"),
        (
            "effnet",
            "EfficientNet-Lite0 at 20 % (calibration offdomain:128; imagenet20: top-1 agreement with the "
            "original, accuracy)",
            "top1_agreement",
        ),
        (
            "minilm",
            "MiniLM-L6 at 20 % (calibration sentences:train:256; sentences:test: cosine of the embeddings)",
            "cosine",
        ),
    ):
        if not d.get(key):
            continue
        lines += [
            f"## {title}",
            "",
            "| method | params removed | size MB | latency | " + metric + " | accuracy | recipe / time |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in d[key]:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} | | | | | |")
                continue
            m = r.get("metrics", {})
            lines.append(
                f"| {r['method']} | {_f(r.get('params_removed'))} | {_f(r.get('bytes', 0) / 1e6, '.1f')} | "
                f"{_f(r.get('latency_ratio'))} | {_f(m.get(metric))} | {_f(r.get('accuracy'))} | "
                f"{r.get('chosen', '')} {r.get('seconds', 0):.0f} s |"
            )
        lines.append("")
    (OUT / "auto.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    global CALIB
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["dinov2", "quantize", "datafree", "peer", "effnet", "minilm", "report"])
    p.add_argument("--targets", default=",".join(str(t) for t in TARGETS))
    p.add_argument("--budget-minutes", type=float, default=BUDGET_MINUTES)
    p.add_argument("--calib", default=CALIB)
    p.add_argument("--skip", default="", help="single methods to leave out (comma-separated labels)")
    args = p.parse_args()
    CALIB = args.calib
    targets = tuple(float(t) for t in args.targets.split(","))
    if args.what == "dinov2":
        bench_dinov2(targets, args.calib, args.budget_minutes, frozenset(filter(None, args.skip.split(","))))
    elif args.what == "quantize":
        bench_quantize(args.calib, args.budget_minutes, targets)
    elif args.what == "datafree":
        bench_datafree(args.budget_minutes)
    elif args.what == "peer":
        bench_peer(targets)
    elif args.what == "effnet":
        bench_effnet(args.budget_minutes)
    elif args.what == "minilm":
        bench_minilm(args.budget_minutes)
    else:
        write_markdown(json.loads((OUT / "auto.json").read_text()))


if __name__ == "__main__":
    main()
