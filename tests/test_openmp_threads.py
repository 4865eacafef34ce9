"""The swap engine's thread runs its copies on one OpenMP thread without changing anyone else's."""

from __future__ import annotations

import threading

import pytest
import torch

from cadenza.kvstore.openmp_threads import limit_this_thread


def _in_new_thread(fn):
    result = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


@pytest.fixture
def new_threads_start_with_two():
    """Other tests may have set torch's default for new threads; make it 2 and restore it.

    ``torch.set_num_threads`` in a throwaway thread changes only that default (and the
    throwaway thread's own setting)."""
    before = _in_new_thread(torch.get_num_threads)
    _in_new_thread(lambda: torch.set_num_threads(2))
    yield 2
    _in_new_thread(lambda: torch.set_num_threads(before))


def test_limit_applies_to_the_calling_thread_only(new_threads_start_with_two):
    main_threads = torch.get_num_threads()
    new_thread_default = _in_new_thread(torch.get_num_threads)
    assert new_thread_default == new_threads_start_with_two

    def limited() -> tuple[bool, int]:
        return limit_this_thread(1), torch.get_num_threads()

    applied, inside = _in_new_thread(limited)
    if not applied:
        pytest.skip("this torch's OpenMP runtime could not be found")
    assert inside == 1
    assert torch.get_num_threads() == main_threads
    # A thread started later (the server's engine thread) still gets the default.
    assert _in_new_thread(torch.get_num_threads) == new_thread_default
