"""A recipe's model, tokenizer, LoRA config and θ0's folder, loaded one way for every command.

The runner (:class:`cpt.runner.TaskSequenceRunner`) and the planner (``cpt plan``,
:func:`cpt.planning.plan.train_experts`) both load through :class:`RecipeModels`, so an
expert the planner trains is loaded exactly as a run would load it (dtype, attention
implementation, revision, ``trust_remote_code``, LoRA settings).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cpt.errors import CptError
from cpt.recipe import Recipe
from cpt.tensors import no_zero3_init

__all__ = ["RecipeModels"]


class RecipeModels:
    """Loads what a recipe's ``model:`` and ``peft:`` sections describe.

    Usage::

        models = RecipeModels(recipe)
        base = models.resolve_base()             # θ0: a local folder or a hub id
        tokenizer = models.load_tokenizer(base)
        trainer = CptSFTTrainer(model=models.load_model(base), processing_class=tokenizer,
                                peft_config=models.peft_config(), ...)

    Args:
        recipe: the validated recipe.
        distributed: accelerate's ``PartialState`` of the run (default: the process's own);
            :meth:`resolve_base` lets the main process fetch θ0 before the others look for it.
    """

    def __init__(self, recipe: Recipe, distributed: Any = None):
        self.recipe = recipe
        self._distributed = distributed

    @property
    def distributed(self):
        if self._distributed is None:
            from accelerate import PartialState

            self._distributed = PartialState()
        return self._distributed

    def resolve_base(self) -> str:
        """θ0 as ``from_pretrained`` takes it: the recipe's ``model.name_or_path``, an offline asset's
        folder for an asset name (``cpt assets list``). The main process fetches first; the others
        then find it cached."""
        from cpt.assets import resolve_model

        name = self.recipe.model.name_or_path
        if self.distributed.is_main_process:
            resolve_model(name)
        self.distributed.wait_for_everyone()
        return resolve_model(name)

    def base_folder(self, base: str) -> Path:
        """A local folder of θ0 (merge strategies and geometry read it tensor by tensor): ``base``
        itself when it is a folder, else a snapshot of the hub model's ``*.json`` and ``*.safetensors``."""
        if Path(base).is_dir():
            return Path(base)
        from huggingface_hub import snapshot_download

        try:
            return Path(
                snapshot_download(base, revision=self.recipe.model.revision, allow_patterns=["*.json", "*.safetensors"])
            )
        except Exception as exc:
            raise CptError(
                f"model.name_or_path: cannot download {base!r} ({type(exc).__name__}); use a local folder or an asset"
            ) from None

    def load_model(self, path: str):
        """A causal LM from ``path`` (θ0, a state or an expert folder) with the recipe's dtype,
        attention implementation and ``trust_remote_code`` (and its revision when ``path`` is θ0's
        hub id). Under a registered DeepSpeed ZeRO-3 config it loads partitioned (see
        :meth:`load_eval_model` for a whole one)."""
        from transformers import AutoModelForCausalLM

        spec = self.recipe.model
        dtype = "auto" if spec.dtype == "auto" else getattr(torch, spec.dtype)
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code, "use_safetensors": True}
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        if path == spec.name_or_path and spec.revision:
            kwargs["revision"] = spec.revision
        try:
            return AutoModelForCausalLM.from_pretrained(path, **kwargs)
        except OSError as exc:
            raise CptError(
                f"model.name_or_path: cannot load {path!r} ({str(exc).splitlines()[0]}); "
                "use a local HF folder or an offline asset (`cpt assets list`)"
            ) from None

    def load_eval_model(self, path: str):
        """:meth:`load_model`, whole (never ZeRO-3 partitioned): for evaluation on the main process."""
        with no_zero3_init():
            return self.load_model(path)

    def load_tokenizer(self, path: str):
        """The tokenizer at ``path``; one without a pad token pads with its EOS token."""
        from transformers import AutoTokenizer

        spec = self.recipe.model
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        except OSError as exc:
            raise CptError(
                f"model.name_or_path: cannot load a tokenizer from {path!r} ({str(exc).splitlines()[0]})"
            ) from None
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def peft_config(self):
        """The recipe's ``peft:`` section as a ``peft.LoraConfig`` for a causal LM; None: full fine-tuning."""
        if self.recipe.peft is None:
            return None
        from peft import LoraConfig

        return LoraConfig(task_type="CAUSAL_LM", **self.recipe.peft.model_dump())
