# Two commands (see README):
#   make demo   set everything up, then run the main job on a real pretrained model
#   make test   set everything up, then run the whole test suite (what CI runs)
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
OUT := out

.PHONY: setup demo test lint

setup:
	@bash tools/setup_env.sh

demo: setup
	@mkdir -p $(OUT)
	$(BIN)/fold-onnx export dinov2_s_backbone $(OUT)/dinov2_s_backbone.onnx
	$(BIN)/fold-onnx fold $(OUT)/dinov2_s_backbone.onnx $(OUT)/dinov2_s_folded.onnx \
		--target-params 0.2 --groups mlp,heads --repair ar --report $(OUT)/dinov2_s_fold_report.json
	$(BIN)/fold-onnx eval $(OUT)/dinov2_s_backbone.onnx $(OUT)/dinov2_s_folded.onnx --data imagenet20

test: setup
	$(BIN)/ruff check foldonnx tests tools
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check foldonnx tests tools
