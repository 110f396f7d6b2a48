"""Fidelity of fold / prune-l1 with and without data repair on DINOv2-S (real weights).

    python tools/bench_fidelity.py                 # 10/20/30 % params, fold and prune-l1
    python tools/bench_fidelity.py --ratios 0.2 --calib augmented:128 --repairs none,bias,ridge

For each target (fraction of parameters removed, ``groups="mlp,heads"``, each method's own
allocation) and method, the model is compressed without repair and with data repair
(``repair="data"``, consumer refit ``bias`` / ``ridge``) on the augmented calibration set
(``foldonnx.data.calibration``: random crops of the skimage photos and upsampled
CIFAR — never the evaluation images). Metrics against the original model on ``imagenet20``:
cosine of the CLS token (token 0 of ``last_hidden_state``) and mean cosine over all tokens.

Writes ``benchmarks/fidelity.json`` and ``benchmarks/fidelity.md`` (generated, not edited).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks"
CACHE = Path(os.environ.get("FOLDONNX_BENCH_CACHE", "/tmp/foldonnx-bench"))


def _session(model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model if isinstance(model, (str, bytes)) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def _run(sess, x: np.ndarray, batch: int = 10) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + batch]})[0] for i in range(0, len(x), batch)])


def main(argv: list[str] | None = None) -> int:
    import onnx

    from foldonnx import fold
    from foldonnx.data.calibration import augmented_images
    from foldonnx.data.sources import Preprocess, load_source
    from foldonnx.evaluate.metrics import cls_token_cosine, cosine_similarity
    from foldonnx.exporter.export import export_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.1,0.2,0.3", help="fractions of parameters removed")
    ap.add_argument("--methods", default="fold,prune-l1")
    ap.add_argument("--repairs", default="none,ridge", help="none / bias / ridge (consumer refit)")
    ap.add_argument("--calib", default="augmented:64", help="calibration SOURCE (augmented:N)")
    ap.add_argument("--out", default=str(OUT / "fidelity"), help="output stem (.json / .md)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "dinov2_s_backbone.onnx"
    if not path.exists():
        export_model("dinov2_s_backbone", path)
    model = onnx.load(str(path))
    t_start = time.perf_counter()
    x_eval = Preprocess(size=224)(load_source("imagenet20"))
    ref = _run(_session(model), x_eval)
    n_cal = int(args.calib.partition(":")[2] or 256)
    calib = Preprocess(size=224, resize=224)(augmented_images(n_cal, size=224))

    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            for rep in args.repairs.split(","):
                t0 = time.perf_counter()
                kw = (
                    {}
                    if rep == "none"
                    else {"repair": "data", "calib": calib, "calib_limit": n_cal, "refit": rep}
                )
                folded, report = fold(model, target_params=ratio, groups="mlp,heads", method=method, **kw)
                secs = time.perf_counter() - t0
                out = _run(_session(folded), x_eval)
                row = {
                    "target_params": ratio,
                    "params_removed": round(report.params_removed, 4),
                    "method": method,
                    "repair": rep,
                    "cls_cosine": round(cls_token_cosine(ref, out), 4),
                    "token_cosine": round(cosine_similarity(ref, out), 4),
                    "seconds": round(secs, 1),
                    "notes": [n for n in report.notes if n.startswith("consumer refit")],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "model": "dinov2_s_backbone (last_hidden_state; CLS = token 0)",
        "groups": "mlp,heads",
        "eval": "imagenet20 (20 images)",
        "calibration": f"{args.calib} (seed 0; skimage photos crops + CIFAR upsampled)",
        "command": "python tools/bench_fidelity.py " + " ".join(argv or []),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows,
    }
    out_stem = Path(args.out)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    out_stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Fidelity: DINOv2-S, fold vs prune-l1, with and without data repair",
        "",
        "Generated by `tools/bench_fidelity.py` — do not edit. Metrics vs the uncompressed model on "
        f"{result['eval']}; calibration {result['calibration']}; total {result['total_seconds']} s.",
        "",
        "| params removed | method | repair | CLS cosine | token cosine | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {100 * r['params_removed']:.1f}% | {r['method']} | {r['repair']} | "
            f"{r['cls_cosine']:.4f} | {r['token_cosine']:.4f} | {r['seconds']} |"
        )
    out_stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
