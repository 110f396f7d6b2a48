"""Data that flows into models: real image sources, calibration sets (augmented crops,
synthetic noise images) and activations streamed out of models at chosen tensors.

* :mod:`.sources` — built-in real data, image folders, ``.npz`` inputs, preprocessing.
* :mod:`.calibration` — calibration sets (``augmented:N``, ``synthetic:N``) and model feeds.
"""
