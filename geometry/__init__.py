"""Hidden-state geometry of in-context learning ([Y] Yang et al., NeurIPS 2025): separability, alignment of the
query states with the label words' unembedding, effective dimension, denoising and semantic decoding, layer by
layer, with bootstrap confidence intervals.

Pure array functions live in :mod:`geometry.measures`, scikit-learn style estimators in
:mod:`geometry.estimators`, the store sweep in :mod:`geometry.sweep`, the transition in :mod:`geometry.transition`
and figures in :mod:`geometry.plots`. Submodules are imported on first use, so ``import geometry`` is cheap and
never imports torch.
"""

from __future__ import annotations

from extraction.lazy import lazy_getattr

# Bound eagerly: the function shares its name with its module, and a lazy attribute would be shadowed by the
# module as soon as anything imports ``geometry.transition``. The module needs only numpy.
from geometry.transition import Transition, transition

_EXPORTS = {
    "MeasureError": "geometry.errors",
    "MEASURES": "geometry.names",
    "separability": "geometry.measures",
    "singular_alignment": "geometry.measures",
    "variance_alignment": "geometry.measures",
    "mean_alignment": "geometry.measures",
    "composite_alignment": "geometry.measures",
    "alignment_by_pair": "geometry.measures",
    "effective_dimension": "geometry.measures",
    "output_alignment": "geometry.measures",
    "denoising_gain": "geometry.measures",
    "lens_logits": "geometry.lens",
    "store_lens": "geometry.lens",
    "semantic_decoding": "geometry.semantic",
    "decode_store_directions": "geometry.semantic",
    "Separability": "geometry.estimators",
    "Alignment": "geometry.estimators",
    "EffectiveDimension": "geometry.estimators",
    "DenoisingGain": "geometry.estimators",
    "measure": "geometry.sweep",
    "measure_groups": "geometry.sweep",
    "table": "geometry.sweep",
    "tidy": "geometry.sweep",
    "plot_measures": "geometry.plots",
    "plot_effective_dimension": "geometry.plots",
    "plot_projections": "geometry.plots",
    "plot_store": "geometry.plots",
}

__all__ = sorted([*_EXPORTS, "Transition", "transition"])

__getattr__ = lazy_getattr(__name__, _EXPORTS)
