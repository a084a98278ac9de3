"""A worker's model recipe carries the client's load options (dtype, attention, device map, memory caps)."""

from extraction.distributed import ModelRecipe
from extraction.models import load_model


def test_recipe_carries_the_load_options_to_the_workers(tiny_gemma_dir):
    loaded = load_model(str(tiny_gemma_dir), dtype="bfloat16", attn_implementation="eager",
                        device_map={"": "cpu"})
    recipe = ModelRecipe.of(loaded)
    assert recipe.options == {"dtype": "bfloat16", "attn_implementation": "eager", "device_map": {"": "cpu"}}
    again = load_model(recipe.spec, **recipe.options)
    for key in ("dtype", "attn_implementation", "device_map"):
        assert again.provenance[key] == loaded.provenance[key]
    assert hash(recipe) == hash(ModelRecipe.of(again))


def test_a_plain_load_gives_only_its_dtype_and_attention(tiny_gemma):
    assert set(ModelRecipe.of(tiny_gemma).options) == {"dtype", "attn_implementation"}
