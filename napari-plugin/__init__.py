"""DenoiSeg in napari: train on painted nuclei, predict, correct, retrain and export without leaving the viewer.

Install with ``pip install "denoiseg[napari]"``; napari finds the widgets (Plugins > DenoiSeg)
and the sample data (File > Open Sample > DenoiSeg) through ``napari.yaml``. Only the
widgets import Qt and napari; :mod:`denoiseg_napari.layer_data`,
:mod:`denoiseg_napari.training_run` and :mod:`denoiseg_napari.predictor` are plain Python.
"""
