"""``sweep`` with ``auto`` as a method: one searched point per ratio beside the single methods
(random-init tiny ViT: graph handling and bookkeeping, not accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from foldonnx.cli import main


def test_sweep_includes_auto_beside_single_methods(tiny_vit_onnx: Path, tmp_path: Path) -> None:
    calib = tmp_path / "c.npz"
    np.savez(calib, image=np.random.default_rng(3).normal(size=(16, 3, 32, 32)).astype(np.float32))
    out = tmp_path / "sweep"
    rc = main(
        ["sweep", str(tiny_vit_onnx), "--ratios", "0.2", "--axis", "params", "--methods", "fold,auto",
         "--data", str(calib), "--calib", str(calib), "--option", "auto.methods=fold,prune",
         "--option", "auto.budget_minutes=0.2", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    rows = json.loads((out / "sweep.json").read_text())["points"]
    by_method = {r["method"]: r for r in rows if r.get("ratio") == 0.2}
    assert set(by_method) >= {"fold", "auto"}
    removed = 1 - by_method["auto"]["params"] / next(r for r in rows if r["method"] == "original")["params"]
    assert abs(removed - 0.2) <= 0.02
