"""The SFTTrainer cpt trains every expert with: TRL's, plus a guard against divergence."""

from __future__ import annotations

import torch
from trl import SFTTrainer

from cpt.errors import TrainingDivergedError


class CptSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` with two small additions.

    * **Loss terms from callbacks.** Any callback with a ``loss_term(model) -> Tensor``
      method (e.g. ``callbacks.EWCCallback``) has that term added to the training loss of
      every step, so regularisers stay reusable callbacks.
    * **Divergence guard.** The task stops as soon as the training loss is not finite
      (checked per step: the logged loss hides non-finite values through
      ``logging_nan_inf_filter``). Raising before ``on_train_end`` means no integration
      happens, so the last good state stays in place.
    """

    def loss_terms(self) -> list:
        return [callback for callback in self.callback_handler.callbacks if callable(getattr(callback, "loss_term", None))]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        terms = self.loss_terms()
        if terms:
            loss = loss + sum(callback.loss_term(model) for callback in terms)
            result = (loss, *result[1:]) if return_outputs else loss
        if not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingDivergedError(
                f"training loss became {loss.detach().float().mean().item()} at step {self.state.global_step + 1}; "
                "the task was stopped and the previous state kept; lower the learning rate or check the data"
            )
        return result
