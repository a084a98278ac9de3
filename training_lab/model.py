"""A small attention-only transformer, batched over runs: every weight has a leading run dimension, so several
seeds train at once as one model (one einsum per product instead of one model per seed).

Per block: causal self-attention with ``n_heads`` heads (no 1/sqrt(d) score scaling unless asked), optional output
projection W_O (without it each head's mixed values are written into its slice of the residual stream), and a
residual connection; no MLP, and no norm unless ``pre_norm`` ([S]'s pre-LayerNorm: a LayerNorm with learned
gain and bias feeds each block's attention and the read-out, so ``readout.input`` is the normalised query state;
the residual stream itself stays un-normalised); with ``positions = "rotary"`` queries and keys are rotated by
their positions (:func:`rotate`) before their hook points. The read-out, on the query (last) position's final
residual state, is a two-layer ReLU MLP into the labels (``readout = "mlp"``, [M]) or one matrix W_U (d, L)
without bias (``"linear"``, [S]'s unembedding: its rows are the label directions in the residual stream). Each
run's weights are drawn from its own seed in a fixed order, so a run's initial weights do not depend on which
other runs share the batch.

Hook points (value shapes; R runs, B batch, S positions, H heads, E head width, d width, h read-out width):
``embed`` (R,B,S,d); per block b: ``blocks.b.attn.q|k|v`` (R,B,S,H,E), ``blocks.b.attn.scores`` (R,B,H,S,S)
pre-softmax with the causal mask applied (-inf above the diagonal), ``blocks.b.attn.pattern`` (R,B,H,S,S),
``blocks.b.attn.z`` (R,B,S,H,E) mixed values, ``blocks.b.attn.head_out`` (R,B,S,H,d) each head's contribution to
the residual stream, ``blocks.b.resid_post`` (R,B,S,d); ``readout.input`` (R,B,d), ``readout.hidden`` (R,B,h)
after the ReLU (MLP read-out only), ``logits`` (R,B,L). Residual *state* l (the toolkit's ``layer``) is
``embed`` for l = 0 and ``blocks.{l-1}.resid_post`` after; :meth:`LabTransformer.state_names` lists them.
The trainer computes the last block at the query position only while no hook is attached to it (the loss reads
nothing else), and at every position otherwise, so hooks always see the full shapes above.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from training_lab.config import ModelConfig, TaskConfig
from training_lab.hooks import HookPoint, Hooks
from training_lab.points import BLOCK_POINTS, model_points


def run_generators(seeds: tuple[int, ...], purpose: int) -> list[torch.Generator]:
    """One torch generator per seed for one ``purpose`` (0 init, 1 world, 2 training data, 3 evaluation data),
    derived through numpy's SeedSequence so that streams of different purposes and seeds never overlap."""
    return [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, purpose]).generate_state(1)[0]))
            for seed in seeds]


class LabTransformer(nn.Module):
    """The lab's hooked attention-only transformer for ``len(seeds)`` runs at once."""

    def __init__(self, model: ModelConfig, task: TaskConfig, seeds: tuple[int, ...]):
        super().__init__()
        self.config, self.n_runs = model, len(seeds)
        d, heads = model.width, model.n_heads
        self.head_width = d // heads
        shapes: dict[str, tuple[int, ...]] = {}
        if model.embed == "linear":
            shapes["W_E"] = (task.token_dims, d)
        for block in range(model.n_blocks):
            for name in ("W_Q", "W_K", "W_V"):
                shapes[f"blocks.{block}.{name}"] = (d, heads, self.head_width)
            if model.output_projection:
                shapes[f"blocks.{block}.W_O"] = (heads, self.head_width, d)
            if model.pre_norm:
                shapes.update({f"blocks.{block}.g_norm": (d,), f"blocks.{block}.b_norm": (d,)})
        if model.pre_norm:
            shapes.update({"readout.g_norm": (d,), "readout.b_norm": (d,)})
        if model.readout == "linear":
            shapes["readout.W_U"] = (d, task.n_labels)
        else:
            shapes.update({"readout.W_1": (d, model.readout_width), "readout.b_1": (model.readout_width,),
                           "readout.W_2": (model.readout_width, task.n_labels), "readout.b_2": (task.n_labels,)})
        generators = run_generators(seeds, 0)
        self.weight_names = list(shapes)
        self.weights = nn.ParameterDict({
            name.replace(".", "_"): nn.Parameter(torch.stack([_init(shape, name, g) for g in generators]))
            for name, shape in shapes.items()
        })
        self.register_buffer("placement", torch.eye(d).reshape(heads, self.head_width, d), persistent=False)
        names = ["embed"] + [f"blocks.{b}.{p}" for b in range(model.n_blocks) for p in BLOCK_POINTS]
        names += list(model_points(model.readout))
        self.points = nn.ModuleDict({name.replace(".", "_"): HookPoint(name) for name in names})
        self.hooks = Hooks({point.name: point for point in self.points.values()})

    def weight(self, name: str) -> torch.Tensor:
        return self.weights[name.replace(".", "_")]

    def hook(self, name: str, value: torch.Tensor) -> torch.Tensor:
        return self.points[name.replace(".", "_")](value)

    def state_names(self) -> list[str]:
        """Hook points of the residual states, index = the toolkit's ``layer`` (0 = embeddings)."""
        return ["embed"] + [f"blocks.{b}.resid_post" for b in range(self.config.n_blocks)]

    @property
    def readout_site(self) -> str:
        """The hook point whose value the read-out's last matrix multiplies: ``readout.hidden`` (MLP) or
        ``readout.input`` (linear)."""
        return "readout.input" if self.config.readout == "linear" else "readout.hidden"

    def readout_rows(self) -> torch.Tensor:
        """(R, L, width of :attr:`readout_site`) the read-out's last matrix, one row per label: W_2's rows in the
        MLP's hidden space, or the label unembeddings W_U's rows in the residual stream."""
        return self.weight("readout.W_U" if self.config.readout == "linear" else "readout.W_2").transpose(1, 2)

    def needs_all_positions(self) -> bool:
        """Whether a hook is attached to the last block (then a forward must compute it at every position)."""
        last = f"blocks.{self.config.n_blocks - 1}."
        return any(point.functions for name, point in self.hooks.points.items() if name.startswith(last))

    def named_weights(self) -> dict[str, torch.Tensor]:
        """Weights by dotted name (``blocks.0.W_Q`` ...), each with the leading run dimension."""
        return {name: self.weight(name) for name in self.weight_names}

    def norm(self, owner: str, value: torch.Tensor) -> torch.Tensor:
        """``owner``'s LayerNorm of ``value`` (..., d) with a gain and bias per run; ``value`` itself without
        ``pre_norm``."""
        if not self.config.pre_norm:
            return value
        shape = (value.shape[0],) + (1,) * (value.dim() - 2) + (value.shape[-1],)
        normed = F.layer_norm(value, value.shape[-1:])
        return normed * self.weight(f"{owner}.g_norm").view(shape) + self.weight(f"{owner}.b_norm").view(shape)

    def forward(self, tokens: torch.Tensor, *, query_only: bool = False) -> torch.Tensor:
        """Logits (R, B, L) of the query from tokens (R, B, S, token_dims).

        ``query_only`` computes the last block for the query position alone (the only one the read-out sees), which
        saves about a fifth of a training step; the last block's hook points then hold one query row (S becomes 1
        in their query/position axis), so :meth:`needs_all_positions` tells a caller when not to use it."""
        if "W_E" in self.weights:
            tokens = torch.einsum("rbsi,rid->rbsd", tokens, self.weight("W_E"))
        resid = self.hook("embed", tokens)
        seq = resid.shape[2]
        future = torch.ones(seq, seq, dtype=torch.bool, device=resid.device).triu(1)
        scale = 1.0 / math.sqrt(self.head_width) if self.config.scale_scores else 1.0
        for block in range(self.config.n_blocks):
            p = f"blocks.{block}"
            rows = resid[:, :, -1:] if query_only and block == self.config.n_blocks - 1 else resid
            normed = self.norm(p, resid)
            q = torch.einsum("rbsd,rdhe->rbshe", self.norm(p, rows), self.weight(f"{p}.W_Q"))
            k = torch.einsum("rbsd,rdhe->rbshe", normed, self.weight(f"{p}.W_K"))
            if self.config.positions == "rotary":
                positions = torch.arange(seq, device=resid.device)
                q, k = rotate(q, positions[seq - rows.shape[2]:]), rotate(k, positions)
            q, k = self.hook(f"{p}.attn.q", q), self.hook(f"{p}.attn.k", k)
            v = self.hook(f"{p}.attn.v", torch.einsum("rbsd,rdhe->rbshe", normed, self.weight(f"{p}.W_V")))
            scores = torch.einsum("rbqhe,rbkhe->rbhqk", q, k) * scale
            scores = self.hook(f"{p}.attn.scores", scores.masked_fill(future[seq - rows.shape[2]:], float("-inf")))
            pattern = self.hook(f"{p}.attn.pattern", softmax(scores))
            z = self.hook(f"{p}.attn.z", torch.einsum("rbhqk,rbkhe->rbqhe", pattern, v))
            out = self.weight(f"{p}.W_O") if self.config.output_projection else self.placement
            equation = "rbqhe,rhed->rbqhd" if out.dim() == 4 else "rbqhe,hed->rbqhd"
            head_out = self.hook(f"{p}.attn.head_out", torch.einsum(equation, z, out))
            resid = self.hook(f"{p}.resid_post", rows + head_out.sum(dim=3))
        query = self.hook("readout.input", self.norm("readout", resid[:, :, -1]))
        if self.config.readout == "linear":
            return self.hook("logits", torch.bmm(query, self.weight("readout.W_U")))
        hidden = torch.relu(torch.baddbmm(self.weight("readout.b_1").unsqueeze(1), query, self.weight("readout.W_1")))
        hidden = self.hook("readout.hidden", hidden)
        logits = torch.baddbmm(self.weight("readout.b_2").unsqueeze(1), hidden, self.weight("readout.W_2"))
        return self.hook("logits", logits)


def rotate(x: torch.Tensor, positions: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Rotary position embedding of queries or keys ``x`` (R, B, S, H, E) at ``positions`` (S,): each pair of
    dimensions (i, i + E/2) turns by the angle position * base^(-2i/E), so a query-key product depends on the
    positions' difference only."""
    half = x.shape[-1] // 2
    frequencies = base ** (-torch.arange(half, dtype=x.dtype, device=x.device) * 2.0 / x.shape[-1])
    angles = positions.to(x.dtype)[:, None, None] * frequencies  # (S, 1, E/2), broadcast over heads
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., :half], x[..., half:]
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension, written out: torch's CPU kernel is several times slower on rows as short
    as a context's (forward and backward); equal to ``scores.softmax(-1)`` to float rounding."""
    exp = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    return exp / exp.sum(dim=-1, keepdim=True)


def _init(shape: tuple[int, ...], name: str, generator: torch.Generator) -> torch.Tensor:
    """Biases start at zero, norm gains at one (neither draws from ``generator``, so the other weights do not
    depend on them); weights ~ N(0, 1/fan_in) with fan_in the input width."""
    if name.rsplit(".", 1)[-1].startswith("b_"):
        return torch.zeros(shape)
    if name.rsplit(".", 1)[-1].startswith("g_"):
        return torch.ones(shape)
    fan_in = shape[0] if not name.endswith("W_O") else shape[0] * shape[1]
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)
