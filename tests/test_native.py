"""heads/ops/native.py: compiled CPU kernels build, can be switched off, fall back with a warning where they cannot be
built, and split their work items over threads."""

import multiprocessing
import os
import threading
import time

import pytest
import torch

from heads.ops import native, upsampled_ce_native


def test_kernels_can_be_switched_off_and_a_failed_build_warns(monkeypatch):
    import torch.utils.cpp_extension

    args = upsampled_ce_native._ARGS
    assert native.kernel("upsampled_ce_rows", "upsampled_ce_rows", args) is not None
    with native.switched_off():
        assert native.kernel("upsampled_ce_rows", "upsampled_ce_rows", args) is None
    assert native.kernel("upsampled_ce_rows", "upsampled_ce_rows", args) is not None

    def no_compiler(*args, **kwargs):
        raise RuntimeError("c++: command not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match="c\\+\\+: command not found.*PyTorch way"):
        assert native.kernel("upsampled_ce_rows", "upsampled_ce_rows", args, ("-DNO_SUCH_BUILD",)) is None


def test_work_items_are_split_into_contiguous_ranges_one_per_thread():
    seen, names = [], set()

    def call(part, first, last):
        seen.append((part, first, last))
        names.add(threading.current_thread().name)
        return 0

    native.run_parts(call, 10, "test", 3)
    assert sorted(seen) == [(0, 0, 3), (1, 3, 6), (2, 6, 10)]
    assert len(names) >= 1 and all(name.startswith("dinov3-heads-kernel") for name in names)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert native.threads_for(10) == 4 and native.threads_for(2) == 2
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(MemoryError, match="kernel test"):
        native.run_parts(lambda part, first, last: 1, 4, "test", 2)


def _split_in_child(queue):
    seen = []
    native.run_parts(lambda part, first, last: seen.append((first, last)) or 0, 4, "test", 2)
    queue.put(sorted(seen))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_gets_its_own_threads():
    """A data-loader worker forked after the parent ran a kernel on threads must not wait on the parent's pool."""
    # the parent's pool with both threads started (each busy when the next item comes), both idle at the fork
    native.run_parts(lambda part, first, last: time.sleep(0.2) or 0, 4, "test", 2)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_split_in_child, args=(queue,), daemon=True)
    child.start()
    assert queue.get(timeout=30) == [(0, 2), (2, 4)]
    child.join(timeout=60)
    assert child.exitcode == 0
