"""The sweep's measure names, in output order: a module of their own so the CLI can list them without numpy."""

from __future__ import annotations

#: The measures of a sweep, in output order (the default set).
MEASURES = ("separability", "output_alignment", "singular_alignment", "variance_alignment", "mean_alignment",
            "composite_alignment", "effective_dimension", "denoising_gain")
#: Measures computed per label pair and averaged over pairs (the others use all examples at once).
PAIRWISE = ("singular_alignment", "variance_alignment", "mean_alignment", "composite_alignment")
