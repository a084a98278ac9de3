"""Integration on the real Gemma 3 270M: ICL prompts align the query states with the label words, zero-shot don't."""

import numpy as np
import pytest

from extraction.extractor import extract
from geometry import measure, transition


@pytest.mark.real_model
def test_icl_alignment_exceeds_zero_shot_in_late_layers(real_model, tmp_path):
    store = tmp_path / "real.zarr"
    for shots in (8, 0):
        extract(real_model, store, task="sentiment", shots=shots, n=32, batch_size=8, progress=False)
    results = {group: measure(store, group, n_boot=0, progress=False) for group in ("icl", "zero_shot")}
    layers = results["icl"]["layer"].values
    last_third = layers[-(len(layers) // 3):]
    print("\nlayer  ICL sep  ICL comp  zero-shot sep  zero-shot comp")
    for layer in layers:
        icl, zero = (results[g]["value"].sel(layer=layer) for g in ("icl", "zero_shot"))
        sep, comp = "separability", "composite_alignment"
        print(f"{layer:5d}  {float(icl.sel(measure=sep)):7.3f}  {float(icl.sel(measure=comp)):8.4f}  "
              f"{float(zero.sel(measure=sep)):13.3f}  {float(zero.sel(measure=comp)):14.4f}")
    for group, result in results.items():
        print(f"{group}: accuracy {result.attrs['accuracy']:.3f}, label accuracy {result.attrs['label_accuracy']:.3f}, "
              f"transition {transition(result).to_dict()}")
    late = {group: float(np.nanmean(r["value"].sel(layer=last_third, measure="composite_alignment")))
            for group, r in results.items()}
    assert late["icl"] > late["zero_shot"]
