"""SIGTERM takes Ctrl-C's clean stop (cpt.stopping): the handler, its scope, the exit status and message."""

import os
import signal
import time

import pytest

from cpt.stopping import Terminated, sigterm_stops_cleanly, stop_exit_status, stop_message, stop_signal


@pytest.fixture
def default_sigterm():
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_raises_a_keyboard_interrupt_inside_and_nothing_is_left_installed_after(default_sigterm):
    with pytest.raises(KeyboardInterrupt) as raised:
        with sigterm_stops_cleanly():
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM should have stopped the block")
    assert isinstance(raised.value, Terminated)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the default handler is back after the block"


def test_a_sigterm_that_lands_in_a_finalizer_is_not_lost(default_sigterm):
    """Python drops an exception raised in __del__; the stop must still come (it did not, with datasets)."""

    class SignalledWhileFinalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs here, inside __del__

    with pytest.raises(Terminated):
        with sigterm_stops_cleanly():
            SignalledWhileFinalized()  # dropped at once: its __del__ runs
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                time.sleep(0.01)
            raise AssertionError("the stop was lost in the finalizer")


def test_a_sigterm_swallowed_by_a_library_is_raised_again_where_cpt_regains_control(default_sigterm):
    from cpt.stopping import raise_if_stop_requested

    with pytest.raises(Terminated):
        with sigterm_stops_cleanly():
            raise_if_stop_requested()  # nothing asked yet
            try:  # datasets' fingerprinting, for one, hashes under a bare except
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            except:  # noqa: E722
                pass
            raise_if_stop_requested()
            raise AssertionError("the swallowed stop was lost")
    raise_if_stop_requested()  # the request ends with the block: a later command is not stopped by it


def test_a_forked_worker_ends_on_sigterm_as_by_default(default_sigterm):
    """Pools end their forked workers with SIGTERM (`with multiprocessing.Pool()` on exit): no Terminated there."""
    import multiprocessing

    with sigterm_stops_cleanly():
        worker = multiprocessing.get_context("fork").Process(target=time.sleep, args=(30,))
        worker.start()
        time.sleep(0.2)  # inside time.sleep, with the inherited handler
        worker.terminate()
        worker.join(timeout=10)
    assert worker.exitcode == -signal.SIGTERM, "killed by the signal, not exit 1 after a Terminated traceback"


def test_a_sigterm_handler_of_the_process_is_kept(default_sigterm):
    received = []
    signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    with sigterm_stops_cleanly():
        os.kill(os.getpid(), signal.SIGTERM)
    assert received == [signal.SIGTERM], "a launcher's or user's handler is not replaced"


def test_exit_status_and_message_say_which_signal_stopped_the_command():
    assert (stop_signal(Terminated()), stop_exit_status(Terminated())) == (signal.SIGTERM, 143)
    assert (stop_signal(KeyboardInterrupt()), stop_exit_status(KeyboardInterrupt())) == (signal.SIGINT, 130)
    assert stop_message(Terminated()) == "stopped by SIGTERM; run the same command again to resume"
    assert stop_message(KeyboardInterrupt()) == "interrupted; run the same command again to resume"
