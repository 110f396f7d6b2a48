"""Benchmark of ``lowrank``: fidelity, linear probe and latency on real models, beside fold/prune.

    python tools/bench_lowrank.py dinov2     # DINOv2-S, 10/20/30/40 % of the parameters
    python tools/bench_lowrank.py ablation   # DINOv2-S at 20 %: fit, compensation, allocation, terms
    python tools/bench_lowrank.py rounding   # DINOv2-S at 20 %: latency of ranks rounded to 1/8/16
    python tools/bench_lowrank.py minilm     # MiniLM-L6 sentence embeddings, 10/20/30 %
    python tools/bench_lowrank.py vitb       # ViT-B/16 (random init): time of the pass, 256 images
    python tools/bench_lowrank.py report     # benchmarks/lowrank.md (+ PNG) from lowrank.json

Every run merges its rows into ``benchmarks/lowrank.json`` and rewrites ``benchmarks/lowrank.md``.

DINOv2-S: the real backbone (``last_hidden_state`` [B, 257, 384]). Calibration: CALIB (128
off-domain crops of CIFAR / Fashion-MNIST plus 128 synthetic 1/f-noise / dead-leaves images:
nothing in common with the evaluation photos). Evaluation: the 20 foolbox ImageNet photos and
the 10 scikit-image photos (30 real photos never used to fit or choose anything): cosine of the
CLS token and of the patch tokens to the original; the Fashion-MNIST linear probe (features
CLS ‖ mean patch; *ref-fit* = the probe fitted on the original's features, *refit* = refitted
per variant; PROBE_TRAIN / PROBE_TEST images of its own train / test splits); batch-1 CPU
latency interleaved with the original (``foldonnx.runtime.bench``), as a ratio.
Methods at matched parameter counts (``target_params``): lowrank (defaults), lowrank with
uniform allocation (every layer loses the same fraction of its parameters), lowrank with one
rank ratio for every layer (the uniform of the 2026-11-29 study), plain SVD (``--calib none``),
and the fold-onnx baselines fold-ar / prune-l1-ar (data-free) and fold with its data repair on
the same calibration images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks"
CACHE = Path(os.environ.get("FOLDONNX_BENCH_CACHE", "/tmp/foldonnx-bench"))
CALIB = "offdomain:128+synthetic:128"
PROBE_TRAIN, PROBE_TEST = 500, 300
MINILM_CALIB, MINILM_EVAL = "sentences:train:256", "sentences:test"
TARGETS = (0.1, 0.2, 0.3, 0.4)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def export_cached(name: str, file: str, **kw) -> Path:
    from foldonnx.exporter.export import export_model

    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / file
    if not out.exists():
        export_model(name, out, **kw)
    return out


def _cos_rows(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


# ------------------------------------------------------------------------------ methods
def run_method(model, method: str, target: float, calib: str, options: dict | None = None):
    """(compressed model, report dict) of *method* at *target* (fraction of parameters)."""
    from foldonnx.passes.base import PassContext
    from foldonnx.passes.registry import make_pass

    opts = dict(options or {})
    if method == "lowrank-ratio":  # one rank ratio for all layers, bisected to the target
        return _rank_ratio(model, target, calib, opts)
    name = {"plain-svd": "lowrank", "fold-data": "fold"}.get(method, method)
    if method.startswith("lowrank") or method == "plain-svd":
        name = "lowrank"
    if method == "fold-data":
        opts.update(repair="data", calib_limit=64)
    if method == "lowrank-uniform":
        opts["allocation"] = "uniform"
    data = "none" if method == "plain-svd" else calib
    if name != "lowrank" and method != "fold-data":
        data = None
    p = make_pass(name, {"target_params": target, **opts})
    res = p.run(model, PassContext(calib=data, verify=False))
    return res.model, res.report.to_dict()


def _rank_ratio(model, target: float, calib: str, opts: dict):
    import onnx

    from foldonnx.graph.stats import model_stats
    from foldonnx.numerics import lowrank as lr
    from foldonnx.passes.base import PassContext
    from foldonnx.passes.lowrank import LowRankPass, find_layers, group_layers, name_nodes

    work = onnx.ModelProto()
    work.CopyFrom(model)
    name_nodes(work)
    groups = group_layers(find_layers(work)[0], False)
    total = model_stats(model).params

    def removed(r: float) -> int:
        out = 0
        for g in groups:
            k = lr.round_rank(r * g.max_rank, 8)
            if k <= lr.break_even_rank(g.n_in, g.n_out):
                out += g.dense_params - lr.factor_params(k, g.n_in, g.n_out)
        return out

    ratios = np.arange(1.0, 0.0, -0.005)
    r = min(ratios, key=lambda x: abs(removed(x) - target * total))
    res = LowRankPass(rank_ratio=float(round(r, 4)), **opts).run(
        model, PassContext(calib=calib, verify=False)
    )
    d = res.report.to_dict()
    d["rank_ratio"] = float(r)
    return res.model, d


# ------------------------------------------------------------------------------ DINOv2-S
class DinoEval:
    """Reference outputs on the evaluation photos and the reference probe, computed once."""

    def __init__(self, path: Path, probe: bool = True) -> None:
        import onnx

        from foldonnx.data.sources import ImageSet, load_source, resolve_preprocess
        from foldonnx.evaluate.evaluation import Evaluator, load_probe_data
        from foldonnx.evaluate.runner import ModelInputs

        self.path = path
        self.model = onnx.load(str(path))
        pre = resolve_preprocess(self.model)
        photos = list(load_source("imagenet20").images) + list(load_source("photos").images)
        x = pre(ImageSet(name="imagenet20+photos", images=photos))
        self.n_eval = len(x)
        data = (
            load_probe_data("fashion-mnist", pre, self.model, train=PROBE_TRAIN, test=PROBE_TEST)
            if probe
            else None
        )
        self.evaluator = Evaluator(
            str(path),
            ModelInputs({"input_image": x}, None, "imagenet20+photos"),
            probe=data,
            threads=None,
            progress=False,
            cache=CACHE / "dinov2_eval_cache.npz",
        )

    def score(self, model) -> dict:
        ce = self.evaluator.evaluate(model, name="candidate")
        out = {k: round(float(v), 4) for k, v in ce.metrics.items() if k in ("cls_cosine", "patch_cosine")}
        if ce.probe is not None:
            out["probe_ref_fit"] = round(ce.probe.transfer, 4)
            out["probe_refit"] = round(ce.probe.refit, 4)
        return out

    def reference(self) -> dict:
        e = self.evaluator
        return {"probe": None if e.reference_probe_acc is None else round(e.reference_probe_acc, 4)}


def _latencies(paths: list[Path], labels: list[str], iters: int = 20) -> dict[str, float | None]:
    from foldonnx.runtime import bench

    res = bench([str(p) for p in paths], provider="cpu", batches=[1], warmup=3, iters=iters, labels=labels)
    return {r.model: (None if r.latency_ratio is None else round(r.latency_ratio, 3)) for r in res}


DINO_METHODS = (
    "lowrank",
    "lowrank-uniform",
    "lowrank-ratio",
    "plain-svd",
    "fold-ar",
    "prune-l1-ar",
    "fold-data",
)


def bench_dinov2(targets=TARGETS, methods=DINO_METHODS, calib: str = CALIB, probe: bool = True) -> list[dict]:
    from foldonnx.onnx_file import save_model

    path = export_cached("dinov2_s_backbone", "dinov2_s_backbone.onnx")
    ev = DinoEval(path, probe)
    rows = []
    work = CACHE / "lowrank_variants"
    work.mkdir(parents=True, exist_ok=True)
    for t in targets:
        paths, labels = [path], ["original"]
        for meth in methods:
            _log(f"DINOv2-S {meth} at {t:g}")
            t0 = time.perf_counter()
            try:
                model, rep = run_method(ev.model, meth, t, calib)
            except Exception as exc:  # noqa: BLE001 - a failing point is a row, not the end
                rows.append({"model": "DINOv2-S", "method": meth, "target": t, "error": str(exc)[:200]})
                continue
            secs = time.perf_counter() - t0
            out = work / f"dino_{meth}_{t:g}.onnx"
            save_model(model, out)
            row = {
                "model": "DINOv2-S",
                "method": meth,
                "target": t,
                "calib": None
                if meth in ("fold-ar", "prune-l1-ar")
                else (
                    "none"
                    if meth == "plain-svd"
                    else (calib if meth != "fold-data" else calib + " (64 used)")
                ),
                "params_removed": round(rep["params_removed"], 4),
                "seconds": round(secs, 1),
                **ev.score(model),
            }
            if meth.startswith("lowrank"):
                row["second_term_kept"] = rep.get("second_term_kept")
                row["ranks"] = [r["rank"] for r in rep.get("layers", [])]
                row["layers"] = [r["name"] for r in rep.get("layers", [])]
                row["stages"] = rep.get("seconds_by_stage")
                if "rank_ratio" in rep:
                    row["rank_ratio"] = rep["rank_ratio"]
            rows.append(row)
            paths.append(out)
            labels.append(meth)
            _log(json.dumps({k: v for k, v in row.items() if k not in ("ranks", "layers")}))
            write(
                {"dinov2": {"rows": rows, **ev.reference(), "eval": f"{ev.n_eval} photos"}}, merge_rows=True
            )
        lat = _latencies(paths, labels)
        for r in rows:
            if r["target"] == t and r["method"] in lat:
                r["latency_ratio"] = lat[r["method"]]
        write({"dinov2": {"rows": rows, **ev.reference(), "eval": f"{ev.n_eval} photos"}}, merge_rows=True)
    return rows


ABLATIONS = {
    "defaults (one-shot fit, sensitivity allocation in 2 rounds, biases kept)": {},
    "sequential fit": {"fit": "sequential"},
    "sequential fit, compensation chosen per layer": {"fit": "sequential", "compensation": "auto"},
    "sequential fit, full compensation": {"fit": "sequential", "compensation": "1"},
    "allocation uniform": {"allocation": "uniform"},
    "allocation error (each layer's own output error)": {"allocation": "error"},
    "sensitivity, 1 round": {"sensitivity_rounds": 1},
    "sensitivity on 4 samples": {"sensitivity_samples": 4},
    "second term auto (columns or two low-rank terms)": {"second_term": "auto"},
    "biases absorb the mean output error (intercept)": {"intercept": True},
    "q/k/v share their input factor": {"share_input": True},
    "whitening ridge 1e-6": {"eps": 1e-6},
    "calibration: off-domain crops only (256)": {"calib": "offdomain:256"},
    "calibration: synthetic images only (256)": {"calib": "synthetic:256"},
}


def bench_ablation(target: float = 0.2, calib: str = CALIB, names: list[str] | None = None) -> list[dict]:
    path = export_cached("dinov2_s_backbone", "dinov2_s_backbone.onnx")
    ev = DinoEval(path, probe=False)
    rows = []
    for name, opts in ABLATIONS.items():
        if names and name not in names:
            continue
        _log(f"ablation {name}")
        t0 = time.perf_counter()
        opts = dict(opts)
        model, rep = run_method(ev.model, "lowrank", target, opts.pop("calib", calib), opts)
        row = {
            "variant": name,
            "options": opts,
            "target": target,
            "params_removed": round(rep["params_removed"], 4),
            "seconds": round(time.perf_counter() - t0, 1),
            **ev.score(model),
            "second_term_kept": rep.get("second_term_kept"),
            "second_term_tried": rep.get("second_term_tried"),
            "layers_factored": len(rep.get("layers", [])),
            "heldout_error_mean": round(float(np.mean([r["heldout_error"] or 0 for r in rep["layers"]])), 5),
        }
        rows.append(row)
        _log(json.dumps(row))
        write({"ablation": {"rows": rows, "calib": calib}}, merge_rows=True, key_fields=("variant",))
    return rows


def bench_rounding(target: float = 0.2, calib: str = CALIB, iters: int = 40) -> list[dict]:
    from foldonnx.onnx_file import save_model

    path = export_cached("dinov2_s_backbone", "dinov2_s_backbone.onnx")
    ev = DinoEval(path, probe=False)
    paths, labels, rows = [path], ["original"], []
    for r in (1, 8, 16):
        _log(f"rounding {r}")
        model, rep = run_method(ev.model, "lowrank", target, calib, {"round_to": r, "min_rank": r})
        out = CACHE / "lowrank_variants" / f"dino_round{r}.onnx"
        out.parent.mkdir(parents=True, exist_ok=True)
        save_model(model, out)
        paths.append(out)
        labels.append(f"round_to {r}")
        rows.append({"round_to": r, "params_removed": round(rep["params_removed"], 4), **ev.score(model)})
    lat = _latencies(paths, labels, iters)
    for row in rows:
        row["latency_ratio"] = lat[f"round_to {row['round_to']}"]
    write({"rounding": {"rows": rows, "iters": iters}})
    return rows


# ------------------------------------------------------------------------------ MiniLM
MINILM_METHODS = ("lowrank", "lowrank-uniform", "plain-svd", "fold-ar", "fold-data")


def bench_minilm(targets=(0.1, 0.2, 0.3), methods=MINILM_METHODS) -> list[dict]:
    import onnx

    from foldonnx.data.feeds import model_feeds
    from foldonnx.onnx_file import save_model
    from foldonnx.runtime.session import create_session

    path = export_cached("minilm_l6", "minilm_l6_dynamic.onnx", batch="dynamic")
    model = onnx.load(str(path))
    feeds, _ = model_feeds(model, MINILM_EVAL)

    def embed(m) -> np.ndarray:
        s = create_session(m, "cpu").session
        n = len(next(iter(feeds.values())))
        return np.concatenate(
            [s.run(None, {k: v[i : i + 32] for k, v in feeds.items()})[0] for i in range(0, n, 32)]
        )

    ref = embed(model)
    rows = []
    for t in targets:
        paths, labels = [path], ["original"]
        for meth in methods:
            _log(f"MiniLM {meth} at {t:g}")
            t0 = time.perf_counter()
            try:
                m2, rep = run_method(model, meth, t, MINILM_CALIB)
            except Exception as exc:  # noqa: BLE001
                rows.append({"model": "MiniLM-L6", "method": meth, "target": t, "error": str(exc)[:200]})
                continue
            out = CACHE / "lowrank_variants" / f"minilm_{meth}_{t:g}.onnx"
            out.parent.mkdir(parents=True, exist_ok=True)
            save_model(m2, out)
            row = {
                "model": "MiniLM-L6",
                "method": meth,
                "target": t,
                "params_removed": round(rep["params_removed"], 4),
                "calib": None if meth == "fold-ar" else ("none" if meth == "plain-svd" else MINILM_CALIB),
                "cosine": round(_cos_rows(ref, embed(m2)), 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            rows.append(row)
            paths.append(out)
            labels.append(meth)
            _log(json.dumps(row))
        lat = _latencies(paths, labels)
        for r in rows:
            if r["target"] == t and r["method"] in lat:
                r["latency_ratio"] = lat[r["method"]]
        write({"minilm": {"rows": rows, "eval": MINILM_EVAL}}, merge_rows=True)
    return rows


# ------------------------------------------------------------------------------ ViT-B timing
def _vitb_child(path: str, calib: str) -> None:
    """In a fresh process: the pass on ViT-B/16 at 20 %, timed (wall and CPU seconds)."""
    import resource

    import onnx

    from foldonnx.passes.base import PassContext
    from foldonnx.passes.lowrank import LowRankPass, mixed_calibration

    model = onnx.load(path)
    ctx = PassContext(calib=calib, verify=False, threads=2)
    mixed_calibration(model, ctx, calib, 256)  # making the images is not the pass's time (cached)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    res = LowRankPass(target_params=0.2, calib_limit=256).run(model, ctx)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    print(
        json.dumps(
            {
                "seconds": round(wall, 1),
                "cpu_seconds": round(cpu, 1),
                "params_removed": round(res.report.params_removed, 4),
                "stages": res.report.seconds_by_stage,
                "load_avg_1min": os.getloadavg()[0],
            }
        )
    )


def bench_vitb(calib: str = "offdomain:128+synthetic:128") -> dict:
    path = export_cached("timm:vit_base_patch16_224", "vit_b16_dynamic.onnx", batch="dynamic")
    proc = subprocess.run(
        [sys.executable, __file__, "_vitb_child", str(path), calib], capture_output=True, text=True
    )
    if proc.returncode != 0:
        row = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    else:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    row.update(model="ViT-B/16 (timm, random init; timing only)", images=256, calib=calib, target_s=180)
    _log(json.dumps(row))
    write({"vitb": row})
    return row


# ------------------------------------------------------------------------------ output
def write(results: dict, merge_rows: bool = False, key_fields=("model", "method", "target")) -> None:
    OUT.mkdir(exist_ok=True)
    path = OUT / "lowrank.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    for k, v in results.items():
        if merge_rows and isinstance(old.get(k), dict) and "rows" in v:
            keys = {tuple(r.get(f) for f in key_fields) for r in v["rows"]}
            kept = [r for r in old[k].get("rows", []) if tuple(r.get(f) for f in key_fields) not in keys]
            v = {**old[k], **v, "rows": kept + v["rows"]}
        old[k] = v
    path.write_text(json.dumps(old, indent=1) + "\n")
    write_markdown(old)


def _f(x, spec: str = ".4f") -> str:
    return "–" if x is None else format(x, spec)


def write_markdown(d: dict) -> None:
    lines = [
        "# fold-onnx lowrank: benchmark",
        "",
        "Generated by `python tools/bench_lowrank.py`; measured on this machine (2 CPU cores shared with "
        "other jobs: seconds are wall time under that load), never edited by hand.",
        "",
    ]
    if "dinov2" in d:
        dd = d["dinov2"]
        lines += [
            "## DINOv2-S (real weights) at matched parameter counts",
            "",
            f"Calibration `{CALIB}` (off-domain crops + synthetic noise images, never the evaluation "
            "photos); "
            f"fidelity on {dd.get('eval', '30 photos')} (foolbox imagenet20 + scikit-image photos); linear "
            f"probe on Fashion-MNIST ({PROBE_TRAIN} train / {PROBE_TEST} test, reference accuracy "
            f"{_f(dd.get('probe'))}); latency: batch 1, CPU, interleaved with the original (ratio < 1 is "
            "faster).",
            "",
            "| target | method | params removed | CLS cosine | patch cosine | probe ref-fit | probe refit | "
            "latency ratio | seconds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        order = {m: i for i, m in enumerate(DINO_METHODS)}
        for r in sorted(dd["rows"], key=lambda r: (r["target"], order.get(r["method"], 99))):
            if "error" in r:
                lines.append(f"| {r['target']:g} | {r['method']} | failed: {r['error']} |" + " |" * 6)
                continue
            lines.append(
                f"| {r['target']:g} | {r['method']} | {100 * r['params_removed']:.1f}% | "
                f"{_f(r.get('cls_cosine'))} | "
                f"{_f(r.get('patch_cosine'))} | {_f(r.get('probe_ref_fit'))} | {_f(r.get('probe_refit'))} | "
                f"{_f(r.get('latency_ratio'), '.3f')} | {r.get('seconds', '')} |"
            )
        lines += [
            "",
            "Methods: *lowrank* = `fold-onnx lowrank --target-params F --calib CALIB` (defaults: one-shot "
            "fit, sensitivity allocation in 2 rounds); *lowrank-uniform* = the same with "
            "`--allocation uniform` (every layer loses the same fraction of its parameters); *lowrank-ratio* "
            "= one rank ratio for every layer (`--rank-ratio R`, R bisected to the target: layers where it "
            "saves nothing stay dense); *plain-svd* = `--calib none`; *fold-ar*, *prune-l1-ar* = data-free "
            "folding / L1 pruning with the `ar` repair; *fold-data* = fold with `--repair data` on 64 of the "
            "calibration images.",
            "",
            "![ranks by layer](lowrank_ranks.png)",
            "",
        ]
    if "ablation" in d:
        a = d["ablation"]
        lines += [
            "## DINOv2-S at 20 %: what each choice is worth",
            "",
            f"Same calibration (`{a.get('calib', CALIB)}`) and photos; one option changed from the defaults "
            "each "
            "row. Differences under ~0.03 CLS cosine are within the noise of 30 images.",
            "",
            "| variant | params removed | CLS cosine | patch cosine | second term kept / tried | "
            "mean held-out layer error | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in a["rows"]:
            kept = sum((r.get("second_term_kept") or {}).values())
            lines.append(
                f"| {r['variant']} | {100 * r['params_removed']:.1f}% | {_f(r.get('cls_cosine'))} | "
                f"{_f(r.get('patch_cosine'))} | {kept} / {r.get('second_term_tried', 0)} | "
                f"{_f(r.get('heldout_error_mean'), '.5f')} | {r['seconds']} |"
            )
        lines.append("")
    if "rounding" in d:
        lines += [
            "## Ranks rounded to multiples of N (DINOv2-S, 20 %)",
            "",
            f"Latency: batch 1, CPU, {d['rounding'].get('iters')} interleaved rounds with the original.",
            "",
            "| round_to | params removed | CLS cosine | latency ratio |",
            "|---|---|---|---|",
        ]
        for r in d["rounding"]["rows"]:
            lines.append(
                f"| {r['round_to']} | {100 * r['params_removed']:.1f}% | {_f(r.get('cls_cosine'))} | "
                f"{_f(r.get('latency_ratio'), '.3f')} |"
            )
        lines.append("")
    if "minilm" in d:
        mm = d["minilm"]
        lines += [
            "## MiniLM-L6 (real weights): sentence embeddings",
            "",
            f"Calibration `{MINILM_CALIB}`; cosine of the sentence embeddings to the original on "
            f"`{mm.get('eval', MINILM_EVAL)}` (397 real sentences, disjoint from the calibration ones). "
            "11.7 M of the 22.6 M parameters are the word-embedding table, which no method here touches.",
            "",
            "| target | method | params removed | cosine | latency ratio | seconds |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(mm["rows"], key=lambda r: (r["target"], r["method"])):
            if "error" in r:
                lines.append(f"| {r['target']:g} | {r['method']} | failed: {r['error']} | | | |")
                continue
            lines.append(
                f"| {r['target']:g} | {r['method']} | {100 * r['params_removed']:.1f}% | "
                f"{_f(r.get('cosine'))} | "
                f"{_f(r.get('latency_ratio'), '.3f')} | {r.get('seconds', '')} |"
            )
        lines.append("")
    if "vitb" in d:
        v = d["vitb"]
        lines += ["## Time of the pass: ViT-B/16, 256 images", ""]
        if "error" in v:
            lines.append(f"failed: {v['error']}")
        else:
            ok = "met" if v["seconds"] < v.get("target_s", 180) else "missed"
            lines += [
                f"{v['model']}, calibration `{v['calib']}`, 20 % of the parameters, 2 ORT threads: "
                f"**{v['seconds']} s** wall (< {v.get('target_s', 180)} s: {ok}), {v['cpu_seconds']} s CPU, "
                f"load average {v['load_avg_1min']:.1f} during the run. Stages (s): {v['stages']}.",
            ]
        lines.append("")
    (OUT / "lowrank.md").write_text("\n".join(lines))


def plot_ranks_from_json() -> None:
    """``benchmarks/lowrank_ranks.png``: the ranks of the lowrank DINOv2-S variant at 20 %."""
    from foldonnx.cli.lowrank import plot_ranks
    from foldonnx.passes.lowrank import LayerReport, LowRankReport

    d = json.loads((OUT / "lowrank.json").read_text())
    row = next(
        (
            r
            for r in d.get("dinov2", {}).get("rows", [])
            if r["method"] == "lowrank" and r["target"] == 0.2 and "ranks" in r
        ),
        None,
    )
    if row is None:
        return
    from foldonnx.graph.stats import ModelStats

    layers = [
        LayerReport(n, "", 0, 0, k, 384, 0, 0) for n, k in zip(row["layers"], row["ranks"], strict=True)
    ]
    rep = LowRankReport(
        name="lowrank",
        config={},
        before=ModelStats(100, 0, 0),
        after=ModelStats(round(100 * (1 - row["params_removed"])), 0, 0),
        allocation="sensitivity",
        layers=layers,
    )
    plot_ranks(rep, OUT / "lowrank_ranks.png")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_vitb_child":
        _vitb_child(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("dinov2", "ablation", "rounding", "minilm", "vitb", "report"))
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--methods", default=None)
    ap.add_argument("--no-probe", action="store_true")
    ap.add_argument("--only", default=None, help="ablation: variant names, '|'-separated")
    args = ap.parse_args()
    targets = tuple(float(t) for t in args.targets.split(","))
    if args.what == "dinov2":
        methods = tuple(args.methods.split(",")) if args.methods else DINO_METHODS
        bench_dinov2(targets, methods, probe=not args.no_probe)
        plot_ranks_from_json()
    elif args.what == "ablation":
        bench_ablation(names=args.only.split("|") if args.only else None)
    elif args.what == "rounding":
        bench_rounding()
    elif args.what == "minilm":
        methods = tuple(args.methods.split(",")) if args.methods else MINILM_METHODS
        bench_minilm(tuple(t for t in targets if t < 0.4), methods)
    elif args.what == "vitb":
        bench_vitb()
    else:
        write_markdown(json.loads((OUT / "lowrank.json").read_text()))
        plot_ranks_from_json()


if __name__ == "__main__":
    main()
