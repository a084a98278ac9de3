import torch

from extraction.capture import forward_last
from heads.prompting import prompt_batches
from heads.task_vectors import head_means, task_vector


def projection_inputs(loaded, reference):
    """Every layer's output-projection input, per batch, recorded by hand."""
    arch, seen = loaded.arch, []
    for _, encoded in reference.batches:
        inputs = {}
        handles = [p.register_forward_pre_hook(lambda m, a, layer=l: inputs.__setitem__(layer, a[0].clone()))
                   for l, p in enumerate(arch.output_projections)]
        try:
            forward_last(loaded.model, encoded.input_ids, encoded.attention_mask)
        finally:
            for h in handles:
                h.remove()
        seen.append((encoded.attention_mask, inputs))
    return seen


def test_task_vector_is_the_sum_of_mean_head_contributions(tiny):
    arch = tiny.arch
    heads = [(0, 1), (arch.n_layers - 1, 2)]
    vector = task_vector(tiny, heads, shots=2, n=5, batch_size=2, progress=False)
    assert vector.shape == (arch.hidden_size,)
    reference = prompt_batches(tiny, shots=2, n=5, batch_size=2)
    expected = torch.zeros(arch.hidden_size)
    for layer, head in heads:
        columns = slice(head * arch.head_dim, (head + 1) * arch.head_dim)
        last = torch.cat([inputs[layer][:, -1, columns] for _, inputs in projection_inputs(tiny, reference)]).mean(0)
        projection = arch.output_projections[layer]
        conv1d = hasattr(projection, "nf")  # GPT-2's Conv1D weight is (in, out); nn.Linear's is (out, in)
        expected += last @ projection.weight[columns, :] if conv1d else projection.weight[:, columns] @ last
    torch.testing.assert_close(vector, expected, atol=1e-5, rtol=1e-4)


def test_head_means_average_real_tokens_only(tiny_gemma):
    arch = tiny_gemma.arch
    means = head_means(tiny_gemma, shots=1, n=4, batch_size=3, progress=False)
    assert means.shape == (arch.n_layers, arch.n_heads, arch.head_dim)
    reference = prompt_batches(tiny_gemma, shots=1, n=4, batch_size=3)
    total, count = torch.zeros(arch.n_heads * arch.head_dim), 0
    for mask, inputs in projection_inputs(tiny_gemma, reference):
        total += inputs[2][mask.bool()].sum(0)
        count += int(mask.sum())
    torch.testing.assert_close(means[2].reshape(-1), total / count, atol=1e-5, rtol=1e-4)
