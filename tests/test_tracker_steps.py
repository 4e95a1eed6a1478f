"""``cpt.trackers``: the step axis of a whole task sequence (the end-to-end check is tests/test_trackers.py)."""

from transformers import TrainerCallback, TrainerControl, TrainerState
from transformers.integrations import TensorBoardCallback
from transformers.trainer_callback import CallbackHandler

from cpt.trackers import STEPS_KEY, is_tracker, offset_tracker_steps, sequence_step


class RecordingTracker(TensorBoardCallback):
    """A TensorBoard callback that records the steps it is shown instead of writing event files."""

    def __init__(self):  # no SummaryWriter (tensorboard need not be installed)
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.steps.append((state.global_step, dict(logs)))

    def on_save(self, args, state, control, **kwargs):
        self.steps.append((state.global_step, "save"))


class RecordingCallback(TrainerCallback):
    """Any other callback (e.g. AIM's, which compares ``state.global_step`` with its own records)."""

    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.steps.append(state.global_step)


def test_sequence_step_sums_the_recorded_optimizer_steps():
    records = [{STEPS_KEY: 3}, {STEPS_KEY: 5}, {"status": "done"}, {STEPS_KEY: 0}]
    assert sequence_step([], []) == 0  # before task 1: the base row's step
    assert sequence_step(records[:1], [10]) == 3  # the record wins over max_steps (e.g. a task stopped early)
    assert sequence_step(records[:2], [10, 10]) == 8
    assert sequence_step(records[:3], [10, 10, 7]) == 15  # an old record without the field: its max_steps
    assert sequence_step(records[:3], [10, 10, -1]) == 8  # ... or 0 when the task trained by epochs
    assert sequence_step(records, [10, 10, None, 4]) == 8


def test_trackers_see_the_offset_step_and_nothing_else_changes():
    tracker, other = RecordingTracker(), RecordingCallback()
    handler = CallbackHandler([tracker, other], model=None, processing_class=None, optimizer=None, lr_scheduler=None)
    state = TrainerState(global_step=2)
    assert is_tracker(tracker) and not is_tracker(other)

    offset_tracker_steps(handler.callbacks, 10)
    handler.on_log(None, state, TrainerControl(), {"loss": 1.5})
    handler.on_save(None, state, TrainerControl())
    assert tracker.steps == [(12, {"loss": 1.5}), (12, "save")]
    assert other.steps == [2] and state.global_step == 2  # the trainer's state and other callbacks: task steps
    assert isinstance(tracker, TensorBoardCallback)  # the instance keeps its class

    offset_tracker_steps(handler.callbacks, 4)  # a new offset replaces the old one (no stacking)
    handler.on_log(None, state, TrainerControl(), {"loss": 1.0})
    assert tracker.steps[-1] == (6, {"loss": 1.0})
    offset_tracker_steps(handler.callbacks, 0)
    handler.on_log(None, state, TrainerControl(), {"loss": 0.5})
    assert tracker.steps[-1] == (2, {"loss": 0.5}) and "on_log" not in vars(tracker)
