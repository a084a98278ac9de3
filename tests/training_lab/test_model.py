import pytest
import torch

from training_lab.errors import LabError
from training_lab.model import LabTransformer
from training_lab.tasks import make_world, sample, stack


def _model_and_tokens(config, seeds=(0, 1)):
    model = LabTransformer(config.model, config.task, seeds)
    generator = torch.Generator().manual_seed(0)
    world = make_world(config.task, generator)
    batch = sample(config.task, world, 6, generator)
    return model, stack([batch] * len(seeds))


def test_every_intermediate_passes_exactly_one_named_hook_point_per_forward(tiny):
    model, batch = _model_and_tokens(tiny)
    expected = ["embed"] + [f"blocks.{b}.{p}" for b in range(2) for p in
                            ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn.head_out",
                             "resid_post")] + ["readout.input", "readout.hidden", "logits"]
    assert model.hooks.names == expected
    calls: list[str] = []
    with model.hooks.add([(name, lambda value, point: calls.append(point.name)) for name in expected]):
        model(batch.tokens)
    assert calls == expected


def test_cached_values_compose_into_the_forward(tiny):
    model, batch = _model_and_tokens(tiny)
    with model.hooks.cache() as cache:
        logits = model(batch.tokens)
    assert torch.equal(cache["logits"], logits)
    pattern = cache["blocks.0.attn.pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(()))
    assert (pattern.triu(1) == 0).all() and torch.isinf(cache["blocks.0.attn.scores"].triu(1)[..., 0, 1]).all()
    resid = cache["embed"] + cache["blocks.0.attn.head_out"].sum(dim=3)
    assert torch.allclose(cache["blocks.0.resid_post"], resid)
    assert torch.equal(cache["readout.input"], cache["blocks.1.resid_post"][:, :, -1])
    assert model.state_names() == ["embed", "blocks.0.resid_post", "blocks.1.resid_post"]


def test_unknown_hook_point_names_the_valid_ones_and_attaches_nothing(tiny):
    model, _ = _model_and_tokens(tiny)
    with pytest.raises(LabError, match=r"unknown hook point 'blocks.2.attn.pattern'; valid names: embed, "):
        with model.hooks.add({"embed": lambda v, p: None, "blocks.2.attn.pattern": lambda v, p: None}):
            pass
    assert all(not point.functions for point in model.hooks.points.values())


def test_hooks_are_removed_even_when_the_block_raises(tiny):
    model, batch = _model_and_tokens(tiny)
    with pytest.raises(RuntimeError):
        with model.hooks.ablate("blocks.0.attn.head_out"), model.hooks.cache(["logits"]):
            raise RuntimeError("boom")
    assert all(not point.functions for point in model.hooks.points.values())


def test_clamp_holds_its_value_and_cuts_gradients_to_what_only_produced_it(tiny):
    model, batch = _model_and_tokens(tiny)
    seq = tiny.task.seq_len
    previous = torch.eye(seq).roll(-1, dims=1).tril()
    previous[0, 0] = 1.0  # a perfect previous-token pattern
    with model.hooks.clamp("blocks.0.attn.pattern", previous), model.hooks.cache(["blocks.0.attn.pattern"]) as cache:
        model(batch.tokens).sum().backward()
    assert torch.equal(cache["blocks.0.attn.pattern"], previous.expand_as(cache["blocks.0.attn.pattern"]))
    for name in ("blocks.0.W_Q", "blocks.0.W_K"):
        grad = model.weight(name).grad
        assert grad is None or not grad.any()
    assert model.weight("blocks.0.W_V").grad.abs().sum() > 0


def test_clamping_nothing_changes_nothing_bitwise_and_a_mask_selects_entries(tiny):
    model, batch = _model_and_tokens(tiny)
    plain = model(batch.tokens)
    nothing = torch.zeros(1, dtype=torch.bool)
    with model.hooks.clamp("blocks.1.attn.head_out", 0.0, nothing):
        assert torch.equal(model(batch.tokens), plain)
    seed_one = torch.tensor([False, True]).view(2, 1, 1, 1, 1)
    with model.hooks.ablate("blocks.1.attn.head_out", seed_one), model.hooks.cache(["blocks.1.attn.head_out"]) as c:
        ablated = model(batch.tokens)
    assert torch.equal(ablated[0], plain[0]) and not torch.equal(ablated[1], plain[1])
    assert not c["blocks.1.attn.head_out"][1].any()


def test_a_runs_weights_do_not_depend_on_the_other_runs_in_the_batch(tiny):
    alone = LabTransformer(tiny.model, tiny.task, (3,))
    together = LabTransformer(tiny.model, tiny.task, (1, 3, 5))
    for name, weight in alone.named_weights().items():
        assert torch.equal(weight[0], together.named_weights()[name][1]), name


@pytest.mark.parametrize("output_projection, scale", [(False, False), (True, True)])
def test_model_options_build_and_run(tiny, output_projection, scale):
    from dataclasses import replace
    config = replace(tiny, model=replace(tiny.model, output_projection=output_projection, scale_scores=scale,
                                         embed="linear", n_heads=2))
    model, batch = _model_and_tokens(config)
    assert ("blocks.0.W_O" in model.named_weights()) is output_projection
    assert "W_E" in model.named_weights()
    assert model(batch.tokens).shape == (2, 6, tiny.task.n_labels)


def test_query_only_last_block_gives_the_same_logits(tiny):
    model, batch = _model_and_tokens(tiny)
    assert torch.allclose(model(batch.tokens, query_only=True), model(batch.tokens), atol=1e-6)
    assert not model.needs_all_positions()
    with model.hooks.cache(["blocks.0.attn.pattern"]):
        assert not model.needs_all_positions()
    with model.hooks.cache(["blocks.1.resid_post"]):
        assert model.needs_all_positions()


def test_pre_layer_norm_normalises_the_attention_and_readout_inputs(tiny):
    from dataclasses import replace

    from torch.nn import functional as F

    config = replace(tiny, model=replace(tiny.model, pre_norm=True))
    model, batch = _model_and_tokens(config)
    with torch.no_grad():
        model.weight("blocks.0.g_norm").mul_(2.0)
        model.weight("blocks.0.b_norm").add_(0.5)
        with model.hooks.cache() as cache:
            model(batch.tokens)
    embed = cache["embed"]
    normed = 2.0 * F.layer_norm(embed, embed.shape[-1:]) + 0.5
    q = torch.einsum("rbsd,rdhe->rbshe", normed, model.weight("blocks.0.W_Q"))
    torch.testing.assert_close(cache["blocks.0.attn.q"], q)
    torch.testing.assert_close(cache["blocks.0.resid_post"], embed + cache["blocks.0.attn.head_out"].sum(dim=3))
    final = cache["blocks.1.resid_post"][:, :, -1]
    torch.testing.assert_close(cache["readout.input"], F.layer_norm(final, final.shape[-1:]))
    plain = LabTransformer(tiny.model, tiny.task, (0, 1))
    assert all(torch.equal(plain.weight(name), model.weight(name)) for name in plain.weight_names)
    assert "blocks.0.g_norm" not in plain.weight_names


def test_rotary_positions_make_scores_depend_on_relative_position_only(tiny):
    from dataclasses import replace

    from training_lab.model import rotate

    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 1, 6, generator=generator)
    dot = [(rotate(q, torch.tensor([i])) * rotate(k, torch.tensor([j]))).sum() for i, j in ((4, 1), (7, 4), (2, 2))]
    torch.testing.assert_close(dot[0], dot[1])
    torch.testing.assert_close(dot[2], (q * k).sum())
    torch.testing.assert_close(rotate(q, torch.tensor([5])).norm(), q.norm())
    config = replace(tiny, model=replace(tiny.model, width=12, n_heads=2, embed="linear", positions="rotary"))
    model, batch = _model_and_tokens(config)
    with model.hooks.cache() as cache:
        model(batch.tokens)
    raw = torch.einsum("rbsd,rdhe->rbshe", cache["embed"], model.weight("blocks.0.W_K"))
    positions = torch.arange(config.task.seq_len)
    torch.testing.assert_close(cache["blocks.0.attn.k"], rotate(raw, positions))
    with pytest.raises(LabError, match="rotary positions need an even head width"):
        replace(tiny.model, width=9, n_heads=3, positions="rotary")
    with pytest.raises(LabError, match="model.positions must be"):
        replace(tiny.model, positions="learned")
