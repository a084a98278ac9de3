"""Semantic decoding of the top singular directions through the unembedding."""

import shutil

import numpy as np
import pytest
import torch

from extraction.store import open_group
from geometry import MeasureError, decode_store_directions, semantic_decoding


class Tokenizer:
    def decode(self, ids):
        return "".join(f"t{i}" for i in ids)


def test_a_planted_direction_decodes_to_its_token():
    rng = np.random.default_rng(0)
    vocab = rng.normal(size=(50, 32))
    along = vocab[7] / np.linalg.norm(vocab[7])
    H = rng.normal(size=(200, 1)) * 10 * along + 0.1 * rng.normal(size=(200, 32)) + 3.0
    first, second = semantic_decoding(H, vocab, Tokenizer(), k_directions=2, top_tokens=5)
    assert "t7" in (first["positive"][0], first["negative"][0])  # the sign of a singular vector is arbitrary
    assert first["variance_share"] > 0.9 and second["variance_share"] < 0.05
    assert len(first["positive_ids"]) == 5 and first["direction"] == 0
    # a torch vocabulary matrix (as the model holds it) gives the same tokens
    assert semantic_decoding(H, torch.tensor(vocab, dtype=torch.float32), Tokenizer())[0]["positive"] == \
        semantic_decoding(H, vocab, Tokenizer())[0]["positive"]
    assert semantic_decoding(H, vocab)[0]["positive"][0].isdigit()  # no tokenizer: ids as text


def test_bad_arguments():
    with pytest.raises(MeasureError, match="k_directions must be an integer >= 1"):
        semantic_decoding(np.ones((4, 3)), np.ones((5, 3)), k_directions=0)


def test_decode_store_directions_writes_attrs(tiny_gemma, tiny_store, tmp_path):
    store = tmp_path / "copy.zarr"
    shutil.copytree(tiny_store, store)
    result = decode_store_directions(tiny_gemma, store, "icl", layers=[2, 4], top_tokens=4)
    written = open_group(store, "icl").attrs["semantic_decoding"]
    assert written == result and sorted(written["layers"]) == ["2", "4"]
    directions = written["layers"]["4"]
    assert len(directions) == 2 and all(len(d["positive"]) == 4 and len(d["negative"]) == 4 for d in directions)
    vocab = tiny_gemma.arch.vocab_size
    assert all(0 <= i < vocab for d in directions for i in d["positive_ids"] + d["negative_ids"])
    with pytest.raises(MeasureError, match=r"layers \[9\] are not in the data"):
        decode_store_directions(tiny_gemma, store, "icl", layers=[9])
