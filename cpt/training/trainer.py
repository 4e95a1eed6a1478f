"""The SFTTrainer cpt trains every expert with: TRL's, plus a guard against divergence."""

from __future__ import annotations

import torch
from trl import SFTTrainer

from cpt.errors import TrainingDivergedError
from cpt.stopping import raise_if_stop_requested
from cpt.tensors import is_zero3


class CptSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` with two small additions.

    * **Loss terms from callbacks.** Any callback with a ``loss_term(model) -> Tensor``
      method (e.g. ``callbacks.EWCCallback``) has that term added to the training loss, so
      regularisers stay reusable callbacks. The term counts exactly once per optimizer
      step whatever the gradient accumulation: when the micro-batch loss is already
      normalised for accumulation (TRL/transformers divide each micro-batch's token sum by
      ``num_items_in_batch``, the tokens of the whole step, and then do not divide by the
      accumulation steps), the term is divided by the number of micro-batches of the step;
      otherwise the Trainer divides loss and term together. Terms apply in training only
      (not to evaluation losses) and are logged as ``<loss_term_name>`` metrics.

      Under DeepSpeed ZeRO-3 the parameters are partitioned outside the forward pass, so a
      term cannot differentiate through them: there ``loss_term`` returns the term's
      value only, and a callback that also has ``add_sharded_gradients(model, loss_scale)``
      adds the term's gradient to the local gradient partitions right before each
      optimizer step (after the last micro-batch's backward, before clipping).
    * **Divergence guard.** The task stops as soon as the training loss is not finite
      (checked per step: the logged loss hides non-finite values through
      ``logging_nan_inf_filter``). Raising before ``on_train_end`` means no integration
      happens, so the last good state stays in place.
    """

    def loss_terms(self) -> list:
        return [
            callback for callback in self.callback_handler.callbacks if callable(getattr(callback, "loss_term", None))
        ]

    def training_step(self, model, inputs, num_items_in_batch=None):
        raise_if_stop_requested()  # a SIGTERM that a library swallowed stops training here (cpt.stopping)
        sharded_terms = [
            callback for callback in self.loss_terms() if callable(getattr(callback, "add_sharded_gradients", None))
        ]
        wrapped = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if not sharded_terms or wrapped is None or not is_zero3(model):
            return super().training_step(model, inputs, num_items_in_batch)
        # accelerate runs DeepSpeed's optimizer step inside backward() at the accumulation
        # boundary; the terms' gradients go in right before it, once per optimizer step.
        engine = wrapped.engine
        engine_step = engine.step

        def step_with_sharded_terms(*args, **kwargs):
            loss_scale = float(getattr(engine.optimizer, "loss_scale", 1.0) or 1.0)
            for callback in sharded_terms:
                callback.add_sharded_gradients(model, loss_scale)
            return engine_step(*args, **kwargs)

        engine.step = step_with_sharded_terms
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            del engine.step  # back to the class's method

    def _micro_batches_if_loss_is_scaled(self, num_items_in_batch) -> int:
        """The micro-batches of this optimizer step if ``Trainer.training_step`` will NOT divide the loss
        by them, else 1.

        Mirrors ``transformers.Trainer.training_step`` (5.x): the loss counts as already
        scaled for gradient accumulation when it was normalised by ``num_items_in_batch``.
        """
        if self.loss_is_scaled_for_ga is not None:
            scaled = self.loss_is_scaled_for_ga
        else:
            scaled = (
                self.model_accepts_loss_kwargs and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        if not scaled:
            return 1
        return max(
            1, int(getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps)
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        loss = result[0] if return_outputs else result
        terms = self.loss_terms() if model.training else []
        if terms:
            values = [callback.loss_term(model) for callback in terms]
            for callback, value in zip(terms, values):
                name = getattr(callback, "loss_term_name", type(callback).__name__)
                self._metrics["train"][name].append(float(value.detach()))
            loss = loss + sum(values) / self._micro_batches_if_loss_is_scaled(num_items_in_batch)
            result = (loss, *result[1:]) if return_outputs else loss
        if not bool(torch.isfinite(loss.detach()).all()):
            raise TrainingDivergedError(
                f"training loss became {loss.detach().float().mean().item()} at step {self.state.global_step + 1}; "
                "the task was stopped and the previous state kept; lower the learning rate or check the data"
            )
        return result
