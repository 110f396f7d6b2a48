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
	$(BIN)/fold-onnx export efficientnet_lite0 $(OUT)/efficientnet_lite0.onnx

test: setup
	$(BIN)/ruff check foldonnx tests tools
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check foldonnx tests tools
