"""The model as a graph: constant tensors (copy-on-write), graph edits, size statistics and the
checks every rewrite passes.

* :mod:`.tensors` — :class:`~foldonnx.graph.tensors.ModelTensors`: constants as numpy arrays.
* :mod:`.stats` — :func:`~foldonnx.graph.stats.model_stats`: parameters, MACs, bytes.
* :mod:`.verify` — onnx.checker, I/O names, ONNX Runtime runs it, output shapes unchanged.
"""
