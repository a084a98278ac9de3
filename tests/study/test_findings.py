import pandas as pd

from icl_geometry.findings import task_findings


def measures_table(values: dict[tuple[str, str], float], n_layers: int = 6) -> pd.DataFrame:
    """A tidy measures table with one constant value per (group, measure) at every layer."""
    return pd.DataFrame([{"group": group, "measure": measure, "layer": layer, "value": value}
                         for (group, measure), value in values.items() for layer in range(n_layers)])


def test_icl_vs_zero_shot_sentence_words_each_change_by_its_sign():
    measures = measures_table({("icl", "separability"): 0.6, ("zero_shot", "separability"): 0.8,
                               ("icl", "composite_alignment"): 0.05, ("zero_shot", "composite_alignment"): 0.01})
    accuracy = pd.DataFrame([{"group": "icl", "shots": 8, "accuracy": 0.8, "label_accuracy": 0.9},
                             {"group": "zero_shot", "shots": 0, "accuracy": 0.0, "label_accuracy": 1.0}])
    transitions = pd.DataFrame(columns=["group", "transition_layer", "plateau_layer"])
    sentences = task_findings(accuracy, measures, transitions)
    sentence = next(s for s in sentences if s.startswith("Over the last third"))
    assert "lower separability (-0.200)" in sentence
    assert "raise composite alignment (+0.040)" in sentence
