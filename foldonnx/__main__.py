"""``python -m foldonnx`` runs the ``fold-onnx`` command line."""

from __future__ import annotations

import sys

from foldonnx.cli import main

sys.exit(main())
