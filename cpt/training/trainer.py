"""The SFTTrainer cpt trains every expert with: TRL's, plus a guard against divergence."""

from __future__ import annotations

import torch
from trl import SFTTrainer

from cpt.errors import TrainingDivergedError


class CptSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` that stops the task as soon as the training loss is not finite.

    The check is per step (the logged loss hides non-finite values by default through
    ``logging_nan_inf_filter``). Raising before ``on_train_end`` means no integration
    happens, so the last good state stays in place.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingDivergedError(
                f"training loss became {loss.detach().float().mean().item()} at step {self.state.global_step + 1}; "
                "the task was stopped and the previous state kept; lower the learning rate or check the data"
            )
        return result
