"""The thread default on a busy machine (memefx/threads.py): a pure choice, tested without a Trainer."""

from __future__ import annotations

import pytest

from memefx.threads import busy_machine_threads


def test_one_thread_when_the_load_reaches_the_cores_and_nothing_was_chosen():
    assert busy_machine_threads({}, load=6.0, cores=2) == 1
    assert busy_machine_threads({}, load=2.0, cores=2) == 1
    assert busy_machine_threads({}, load=0.3, cores=2) is None  # quiet: torch's default (one per core)


def test_the_users_choice_wins():
    assert busy_machine_threads({"OMP_NUM_THREADS": "2"}, load=6.0, cores=2) is None
    assert busy_machine_threads({"MEMEFX_THREADS": "3"}, load=0.1, cores=2) == 3
    with pytest.raises(ValueError, match="MEMEFX_THREADS='many'"):
        busy_machine_threads({"MEMEFX_THREADS": "many"}, load=0.1, cores=2)
