"""Semantic decoding of [Y]: read the top singular directions of the query states through the unembedding.

A direction v (both signs) is scored against every vocabulary row, E v, and the highest-scoring tokens say what
the direction "means" to the model's output; at the transition the label words appear. The whole vocabulary is
needed, which the store does not keep, so :func:`decode_store_directions` takes the loaded model and writes its
small result into the store group's attrs (key ``semantic_decoding``). Its lens is the final norm's gain and
centring as fitted from the model; a model whose norm has no such form is refused. The soft-capping and logit
scaling of some models are monotone and shared by every token, so they leave the ranking, and the result,
unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from geometry.errors import MeasureError
from geometry.kernels import shift, top_right_singular
from geometry.validation import check_int, check_layers, check_states, to_numpy

ATTR = "semantic_decoding"


def _scores(unembedding_matrix: Any, directions: np.ndarray) -> np.ndarray:
    """(vocab, k) scores E v of the directions, computed in the matrix's own library and dtype (a torch vocabulary
    matrix is never copied: 262k x 640 floats are 0.7 GB in float32)."""
    if hasattr(unembedding_matrix, "detach"):
        import torch

        weight = unembedding_matrix.detach()
        with torch.no_grad():
            v = torch.as_tensor(directions.T, dtype=weight.dtype, device=weight.device)
            return (weight @ v).float().cpu().numpy()
    return np.asarray(unembedding_matrix) @ directions.T


def _token_text(tokenizer: Any, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


def semantic_decoding(H: Any, unembedding_matrix: Any, tokenizer: Any = None, k_directions: int = 2,
                      top_tokens: int = 10, *, gain: Any = None, center: bool = False) -> list[dict[str, Any]]:
    """The ``top_tokens`` tokens each of the top ``k_directions`` right singular vectors v of the centred states
    points to, for +v and -v. Returns one dict per direction: ``direction``, ``variance_share`` (its share of the
    total variance), ``positive`` / ``negative`` token texts (``tokenizer.decode``; ids if no tokenizer) and
    ``positive_ids`` / ``negative_ids``.

    To read the directions through the logit lens, pass the final norm's ``gain`` (scores become E (gain * v),
    so a large vocabulary matrix is never copied) and ``center=True`` for a mean-subtracting norm (LayerNorm).
    """
    states = check_states(H)
    k = check_int(k_directions, "k_directions", 1)
    top = check_int(top_tokens, "top_tokens", 1)
    moved = shift(states)
    centred = moved - moved.mean(axis=0)
    basis = top_right_singular(centred, k)
    total = float(np.sum(centred * centred))
    shares = [float(np.sum((centred @ v) ** 2) / total) for v in basis]
    lens = basis - basis.mean(axis=1, keepdims=True) if center else basis
    if gain is not None:
        lens = lens * to_numpy(gain).astype(np.float64)
    scores = _scores(unembedding_matrix, lens)
    out = []
    for r, share in enumerate(shares):
        order = np.argsort(scores[:, r])
        positive, negative = order[::-1][:top].tolist(), order[:top].tolist()
        out.append({
            "direction": r, "variance_share": share,
            "positive": [_token_text(tokenizer, t) for t in positive], "positive_ids": positive,
            "negative": [_token_text(tokenizer, t) for t in negative], "negative_ids": negative,
        })
    return out


def decode_store_directions(loaded: Any, store: str | Path, group: str, layers: Sequence[int] | None = None, *,
                            k_directions: int = 2, top_tokens: int = 10) -> dict[str, Any]:
    """Semantic decoding of a store group's layers (default: all) through the loaded model's logit lens (the
    final norm's gain and centring as ``extraction`` fits them, then the whole vocabulary), written to the group's
    attrs under ``semantic_decoding`` as ``{"k_directions", "top_tokens", "lens", "layers": {layer: [...]}}``;
    returns that dict."""
    from extraction.architecture import final_norm_form
    from extraction.store import consolidate, open_group, open_root

    ds = open_group(store, group)
    chosen = check_layers(ds["layer"].values, layers)
    form = final_norm_form(loaded.arch)
    if not form.exact:
        raise MeasureError("the model's final norm has no gain/bias form (final_norm_form(...).exact is False), so "
                           "its logit lens cannot be applied to directions; semantic decoding is not available for "
                           "this model")
    result = {
        "k_directions": k_directions, "top_tokens": top_tokens,
        "lens": "final norm's gain" + (" and centring" if form.center else "") + ", then the whole unembedding",
        "layers": {
            str(layer): semantic_decoding(ds["hidden"].sel(layer=layer).values, loaded.arch.unembedding.weight,
                                          loaded.tokenizer, k_directions, top_tokens, gain=form.gain,
                                          center=form.center)
            for layer in chosen
        },
    }
    open_root(store, mode="a")[group].attrs[ATTR] = result
    consolidate(store)
    return result
