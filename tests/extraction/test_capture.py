import pytest
import torch

from extraction.capture import capture_query_states, query_positions, run_with_capture
from extraction.models import load_model

TEXTS = ["a great movie . Sentiment :", "bad", "the food was cold and the service slow . Sentiment :"]


@pytest.mark.parametrize("name", ["gemma3", "llama", "gpt2"])
def test_captured_states_equal_output_hidden_states(tiny_model_dirs, name):
    loaded = load_model(str(tiny_model_dirs[name]))
    for text in TEXTS:
        encoded = loaded.tokenizer([text], return_tensors="pt")
        states, logits = run_with_capture(loaded, encoded["input_ids"], encoded["attention_mask"])
        with torch.no_grad():
            reference = loaded.model(**encoded, output_hidden_states=True)
        hidden = reference.hidden_states
        assert states.shape == (1, loaded.arch.n_states, loaded.arch.hidden_size)
        for layer in range(loaded.arch.n_layers):
            torch.testing.assert_close(states[0, layer], hidden[layer][0, -1], atol=1e-5, rtol=0)
        # Hugging Face's last entry is after the final norm; ours is before it (stated in the store).
        with torch.no_grad():
            torch.testing.assert_close(loaded.arch.final_norm(states[0, -1]), hidden[-1][0, -1], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[0], reference.logits[0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["gemma3", "gpt2"])
def test_left_padded_batch_equals_single_prompts(tiny_model_dirs, name):
    loaded = load_model(str(tiny_model_dirs[name]))
    batch = loaded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    states, logits = run_with_capture(loaded, batch["input_ids"], batch["attention_mask"])
    for row, text in enumerate(TEXTS):
        single = loaded.tokenizer([text], return_tensors="pt")
        alone, alone_logits = run_with_capture(loaded, single["input_ids"], single["attention_mask"])
        torch.testing.assert_close(states[row], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(logits[row], alone_logits[0], atol=1e-5, rtol=1e-5)


def test_query_position_from_mask_handles_both_paddings():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    assert query_positions(mask).tolist() == [3, 2, 3]


def test_hooks_are_removed_even_after_an_error(tiny_gemma):
    arch = tiny_gemma.arch
    with pytest.raises(RuntimeError):
        with capture_query_states(arch, torch.tensor([0])):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in arch.layers)
