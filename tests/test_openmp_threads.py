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


def test_limit_applies_to_the_calling_thread_only():
    main_threads = torch.get_num_threads()
    if main_threads < 2:
        pytest.skip("needs a torch with at least two threads")

    def limited() -> tuple[bool, int]:
        return limit_this_thread(1), torch.get_num_threads()

    applied, inside = _in_new_thread(limited)
    if not applied:
        pytest.skip("this torch's OpenMP runtime could not be found")
    assert inside == 1
    assert torch.get_num_threads() == main_threads
    # A thread started later (the server's engine thread) still gets the default.
    assert _in_new_thread(torch.get_num_threads) == main_threads
