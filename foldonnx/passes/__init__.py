"""Passes: rewrites of an ONNX model behind one interface, composed into verified pipelines.

* :mod:`.base` — :class:`~foldonnx.passes.base.Pass`, reports, :class:`~foldonnx.passes.base.Pipeline`.
* :mod:`.config` — typed pass configs (CLI flags, recipe options, sweep options in one place).
* :mod:`.registry` — passes by name; :mod:`.recipe` — recipes; :mod:`.compress` — ``compress()``.
* :mod:`.fold` — folding and magnitude pruning of channel groups; :mod:`.quantize` — ORT INT8/FP16.
"""
