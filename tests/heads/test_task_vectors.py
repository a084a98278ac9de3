import pytest
import torch

from extraction.capture import forward_last
from heads.prompting import prompt_batches
from heads.task_vectors import attention_output_norms, head_means, task_vector


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


def test_projection_space_task_vector_is_the_sum_of_mean_head_projections(tiny):
    arch = tiny.arch
    heads = [(0, 1), (arch.n_layers - 1, 2)]
    vector = task_vector(tiny, heads, shots=2, n=5, batch_size=2, post_norm=False, progress=False)
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


def test_post_attention_norms_are_found_by_what_they_receive(tiny_models):
    for name in ("gemma3", "gemma2"):
        model = tiny_models[name]
        assert [n is layer.post_attention_layernorm for n, layer in
                zip(attention_output_norms(model), model.arch.layers)] == [True] * model.arch.n_layers
    # Their attention output is added to the residual directly (GPT-NeoX and Phi-3 through an attention dropout,
    # the identity in eval mode, which is no norm).
    for name in ("llama", "gpt2", "gpt_neox", "phi3"):
        assert attention_output_norms(tiny_models[name]) == (None,) * tiny_models[name].arch.n_layers


@pytest.mark.parametrize("name", ["gemma3", "llama"])
def test_all_heads_of_a_layer_write_what_the_attention_sublayer_adds(tiny_models, name):
    """Summed over every head of a layer, the residual writes are the attention sublayer's actual write."""
    loaded = tiny_models[name]
    arch, layer = loaded.arch, 1
    vector = task_vector(loaded, [(layer, h) for h in range(arch.n_heads)], shots=1, n=3, batch_size=3, progress=False)
    block = arch.layers[layer]
    writer = block.post_attention_layernorm if name == "gemma3" else arch.attentions[layer]
    seen = []

    def keep_last(module, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output)[:, -1])

    handle = writer.register_forward_hook(keep_last)
    try:
        for _, encoded in prompt_batches(loaded, shots=1, n=3, batch_size=3).batches:
            forward_last(loaded.model, encoded.input_ids, encoded.attention_mask)
    finally:
        handle.remove()
    torch.testing.assert_close(vector, torch.cat(seen).mean(0), atol=1e-4, rtol=1e-4)


def test_bfloat16_model_gets_the_post_norm_task_vector_of_its_float32_twin(tiny_gemma_dir, tiny_gemma):
    """bfloat16 rounding is not mistaken for a norm that is not an RMS norm (the default study runs in bfloat16)."""
    from extraction.models import load_model

    half = load_model(str(tiny_gemma_dir), dtype="bfloat16")
    heads = [(1, h) for h in range(half.arch.n_heads)]
    vector = task_vector(half, heads, shots=1, n=4, batch_size=2, progress=False)
    expected = task_vector(tiny_gemma, heads, shots=1, n=4, batch_size=2, progress=False)
    assert vector.dtype == torch.float32
    torch.testing.assert_close(vector, expected, atol=0.05 * expected.abs().max().item(), rtol=0.05)
