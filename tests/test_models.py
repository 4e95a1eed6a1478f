"""``cpt.models.RecipeModels``: the one way the runner and ``cpt plan`` load a recipe's models."""

from pathlib import Path

import pytest
import torch

from cpt.errors import CptError
from cpt.models import RecipeModels
from cpt.recipe import validate_recipe
from cpt.testing import build_tiny_model

from tiny_recipes import make_recipe


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", seed=0)


def test_loads_what_the_recipe_says(tmp_path, tiny_model):
    data = make_recipe(tmp_path, tiny_model, peft={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    data["model"]["dtype"] = "bfloat16"
    models = RecipeModels(validate_recipe(data))

    base = models.resolve_base()
    assert base == tiny_model  # a local folder is θ0 as given
    assert models.base_folder(base) == Path(tiny_model)
    model = models.load_model(base)
    assert model.dtype == torch.bfloat16  # the recipe's dtype, not the checkpoint's float32
    assert models.load_eval_model(base).dtype == torch.bfloat16
    tokenizer = models.load_tokenizer(base)
    assert tokenizer.pad_token is not None and len(tokenizer) == model.config.vocab_size
    lora = models.peft_config()
    assert (lora.r, lora.lora_alpha, set(lora.target_modules), lora.task_type) == (4, 8, {"q_proj"}, "CAUSAL_LM")
    data.pop("peft")
    assert RecipeModels(validate_recipe(data)).peft_config() is None  # full fine-tuning


def test_missing_model_is_one_line_naming_the_field(tmp_path, tiny_model):
    models = RecipeModels(validate_recipe(make_recipe(tmp_path, tiny_model)))
    with pytest.raises(CptError, match=r"^model\.name_or_path: cannot load '.*nowhere'") as caught:
        models.load_model(str(tmp_path / "nowhere"))
    assert "\n" not in str(caught.value)
    with pytest.raises(CptError, match=r"^model\.name_or_path: cannot load a tokenizer from"):
        models.load_tokenizer(str(tmp_path / "nowhere"))


def test_the_runner_loads_through_the_same_component(tmp_path, tiny_model):
    from cpt.runner import TaskSequenceRunner

    runner = TaskSequenceRunner(validate_recipe(make_recipe(tmp_path, tiny_model)))
    assert isinstance(runner.models, RecipeModels) and runner.models.recipe is runner.recipe
    assert runner.models.distributed is runner.distributed  # θ0 is fetched by the main process first
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tiny_model).state_dict()  # what HF itself loads
    loaded = runner.models.load_model(tiny_model).state_dict()
    assert reference.keys() == loaded.keys()
    assert all(torch.equal(reference[name], loaded[name]) for name in reference)
