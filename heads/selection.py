"""Head sets: the top heads by a score, exclusion of shared heads, random controls and their placement in depth.

A head is a ``(block, head)`` tuple of 0-based indices (decoder block b = 0..L-1, query head h; see
:mod:`heads.scores` for the index convention); a head set is a list of them. Selection follows [Y]: the top
10% of all L x H heads by each score, and a control of the same size drawn at random from outside the top sets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np
import xarray as xr
from scipy.stats import mannwhitneyu

from extraction.interventions import Head
from heads.errors import HeadsError

OVERLAP = ("keep", "pth", "ih")


def set_size(n_layers: int, n_heads: int, *, fraction: float | None = 0.1, k: int | None = None) -> int:
    """``k`` if given, else ``fraction`` of all heads rounded half up (at least one)."""
    total = n_layers * n_heads
    if k is not None:
        if not 1 <= k <= total:
            raise HeadsError(f"k must be between 1 and the number of heads ({total}), not {k}")
        return k
    if fraction is None or not 0 < fraction <= 1:
        raise HeadsError(f"fraction must be in (0, 1], not {fraction}; or give k")
    return max(1, int(np.floor(fraction * total + 0.5)))


def top_heads(scores: xr.Dataset, score: str, *, fraction: float | None = 0.1, k: int | None = None,
              exclude: Iterable[Head] = ()) -> list[Head]:
    """The best heads by ``scores[score]``, highest first, skipping ``exclude`` (the next best fill their places).

    Ties are broken by (block, head) so the result is deterministic.
    """
    if score not in scores:
        raise HeadsError(f"no score {score!r}; the scores hold {', '.join(scores.data_vars)}")
    if set(scores[score].dims) != {"block", "head"}:
        raise HeadsError(f"score {score!r} is over {scores[score].dims}, not (block, head); read stored scores with "
                         "heads.load_scores, which renames an older store's 'layer' to 'block'")
    values = scores[score].transpose("block", "head").values
    size = set_size(*values.shape, fraction=fraction, k=k)
    excluded = {tuple(map(int, h)) for h in exclude}
    order = sorted(np.ndindex(values.shape), key=lambda bh: (-values[bh], bh))
    chosen = [(int(b), int(h)) for b, h in order if (b, h) not in excluded][:size]
    if len(chosen) < size:
        raise HeadsError(f"only {len(chosen)} heads are left after excluding {len(excluded)}; ask for fewer")
    return chosen


def select_sets(scores: xr.Dataset, *, fraction: float | None = 0.1, k: int | None = None,
                overlap: str = "keep") -> dict[str, list[Head]]:
    """Top ``pth`` and ``ih`` sets of equal size.

    ``overlap`` says what happens to a head in both top sets: ``keep`` leaves it in both, ``pth`` keeps it only in
    the PTH set (the IH set takes the next best IH head instead), ``ih`` keeps it only in the IH set.
    """
    if overlap not in OVERLAP:
        raise HeadsError(f"overlap must be one of {', '.join(OVERLAP)}, not {overlap!r}")
    sets = {name: top_heads(scores, name, fraction=fraction, k=k) for name in ("pth", "ih")}
    if overlap != "keep":
        other = "ih" if overlap == "pth" else "pth"
        sets[other] = top_heads(scores, other, fraction=fraction, k=k, exclude=sets[overlap])
    return sets


def random_heads(n_layers: int, n_heads: int, size: int, *, exclude: Iterable[Head] = (), seed: int = 0) -> list[Head]:
    """``size`` heads of ``n_layers`` blocks drawn without replacement from those not in ``exclude``, seeded, sorted
    by (block, head)."""
    excluded = {tuple(map(int, h)) for h in exclude}
    pool = [(b, h) for b in range(n_layers) for h in range(n_heads) if (b, h) not in excluded]
    if not 1 <= size <= len(pool):
        raise HeadsError(f"cannot draw {size} random heads: {len(pool)} heads are outside the excluded sets")
    picked = np.random.default_rng(seed).choice(len(pool), size=size, replace=False)
    return sorted(pool[i] for i in picked)


@dataclass(frozen=True)
class Placement:
    """Where two head sets sit in depth: mean block index of each and a two-sided Mann-Whitney U test on them."""

    name_a: str
    name_b: str
    mean_a: float
    mean_b: float
    u_statistic: float
    p_value: float

    def to_dict(self) -> dict:
        return asdict(self)


def layer_placement(set_a: Sequence[Head], set_b: Sequence[Head], *, names: tuple[str, str] = ("a", "b")) -> Placement:
    """Compare the block indices of two head sets (e.g. IH vs PTH: do induction heads sit deeper?)."""
    if not set_a or not set_b:
        raise HeadsError("layer placement needs two non-empty head sets")
    blocks_a, blocks_b = [b for b, _ in set_a], [b for b, _ in set_b]
    test = mannwhitneyu(blocks_a, blocks_b, alternative="two-sided")
    return Placement(names[0], names[1], float(np.mean(blocks_a)), float(np.mean(blocks_b)),
                     float(test.statistic), float(test.pvalue))


def parse_heads(text: str) -> list[Head]:
    """Parse ``"B.H,B.H"`` (block.head, e.g. ``"3.1,10.0"``) into a head set."""
    heads = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        block, dot, head = item.partition(".")
        if not dot or not block.isdigit() or not head.isdigit():
            raise HeadsError(f"cannot read head {item!r}: write heads as BLOCK.HEAD, e.g. 3.1,10.0")
        heads.append((int(block), int(head)))
    if not heads:
        raise HeadsError(f"no heads in {text!r}: write heads as BLOCK.HEAD, e.g. 3.1,10.0")
    return heads
