import torch

from training_lab import checkpoints


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    weights = {"w": torch.nn.Parameter(torch.randn(2, 3)), "b": torch.nn.Parameter(torch.randn(2, 1))}
    adam = torch.optim.Adam(weights.values(), lr=0.1)
    sum(w.sum() for w in weights.values()).backward()
    adam.step()
    generator = torch.Generator().manual_seed(3)
    path = checkpoints.save(tmp_path, 7, weights, [generator.get_state()] * 2, adam, {"x": 1})
    saved = checkpoints.load(checkpoints.latest(tmp_path))
    assert saved.path == path and saved.step == 7 and torch.equal(saved.weights["w"], weights["w"])
    fresh = torch.optim.Adam(weights.values(), lr=0.1)
    checkpoints.restore_optimizer(fresh, saved.optimizer)
    for index, state in adam.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), fresh.state_dict()["state"][index][name])
    restored = torch.Generator()
    restored.set_state(saved.rng_states[1])
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=generator))
    checkpoints.save(tmp_path, 9, weights, [generator.get_state()], adam, {"x": 1})
    assert [p.name for p in tmp_path.glob("*.safetensors")] == ["step_00000009.safetensors"]
