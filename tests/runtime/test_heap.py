"""The CPU heap setting (engine.runtime.heap): glibc really serves and keeps window-sized blocks from
its heap after it, every way of asking for the defaults is honoured, and bad settings are one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from engine.errors import UserError
from engine.runtime import heap

glibc = pytest.mark.skipif(heap._glibc() is None, reason="the C library is not glibc (nothing to tune)")

# A fresh process: optionally the engine's setting, then an 8 MiB malloc and free, reading glibc's
# own accounting (mallinfo2) of mapped blocks and of the heap's size around them.
_PROBE = textwrap.dedent("""
    import ctypes, json, sys
    from engine.runtime.heap import keep_cpu_heap
    tuning = keep_cpu_heap(sys.argv[1]) if sys.argv[1] != "none" else None
    size = int(sys.argv[2]) << 20
    libc = ctypes.CDLL(None)
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc.mallinfo2.restype = Info
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    before = libc.mallinfo2()
    p = libc.malloc(size)
    during = libc.mallinfo2()
    ctypes.memset(p, 1, size)
    libc.free(p)
    after = libc.mallinfo2()
    print(json.dumps({"mapped": during.hblkhd - before.hblkhd, "heap_free_after": after.fordblks,
                      "applied": None if tuning is None else tuning.applied}))
""")


def _probe(setting: str, mib: int = 8) -> dict[str, int]:
    import json
    import os

    env = {k: v for k, v in os.environ.items() if k != heap.ENV}
    out = subprocess.run([sys.executable, "-c", _PROBE, setting, str(mib)], check=True, capture_output=True,
                         text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def fresh(monkeypatch):
    """The module as in a new process (its result is kept per process)."""
    monkeypatch.setattr(heap, "_done", None)
    for var in (heap.ENV, *heap._GLIBC_VARS, "GLIBC_TUNABLES"):
        monkeypatch.delenv(var, raising=False)
    # keep_cpu_heap sets PyTorch's huge-page switch in os.environ: recorded here so that it is undone
    monkeypatch.setenv(heap.THP_ENV, "0")
    monkeypatch.delenv(heap.THP_ENV)
    # this process allocated tensors long ago: whether huge pages took is asked of a fresh process below
    monkeypatch.setattr(heap, "huge_pages_in_effect", lambda: True)
    monkeypatch.setattr(heap, "_thp_policy", lambda: "madvise")
    return monkeypatch


@glibc
def test_after_the_setting_an_8_mib_block_comes_from_the_heap_and_stays_there():
    """glibc's defaults map a fresh process's 8 MiB block and unmap it on free; with the engine's
    setting the block is carved from the heap, and the heap keeps the memory after the free, so the
    next window's buffers find it without page faults."""
    default = _probe("none")
    kept = _probe("keep")
    assert default["mapped"] >= 8 << 20  # its own mapping, returned to the system on free
    assert kept["applied"] is True
    assert kept["mapped"] == 0 and kept["heap_free_after"] >= 8 << 20  # from the heap, and still held there


@glibc
def test_keep_all_serves_even_a_64_mib_block_from_the_heap():
    """Above 32 MiB (glibc's largest mmap threshold) ``keep`` still maps a block and returns it on free;
    ``keep-all`` maps none, and the heap holds the freed block for the next window."""
    kept = _probe("keep", 64)
    assert kept["applied"] is True and kept["mapped"] >= 64 << 20
    every = _probe("keep-all", 64)
    assert every["applied"] is True
    assert every["mapped"] == 0 and every["heap_free_after"] >= 64 << 20


@glibc
def test_the_first_result_is_kept_and_applied_reports_the_thresholds(fresh):
    first = heap.keep_cpu_heap()
    assert first.applied and first.mmap_threshold == heap.MMAP_THRESHOLD and first.trim_threshold == heap.TRIM_THRESHOLD
    assert first.mmap_max is None  # blocks above the threshold are still mapped
    fresh.setenv(heap.ENV, "default")
    assert heap.keep_cpu_heap() is first  # once per process


@pytest.mark.parametrize("env,reason", [
    ({heap.ENV: "default"}, "AGG2EXP_CPU_HEAP=default"),
    ({heap.ENV: " Default "}, "AGG2EXP_CPU_HEAP=default"),
    ({"MALLOC_TRIM_THRESHOLD_": "131072"}, "MALLOC_TRIM_THRESHOLD_"),
    ({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072"}, "GLIBC_TUNABLES"),
])
def test_the_defaults_and_the_users_own_settings_win(fresh, env, reason):
    calls = []
    fresh.setattr(heap, "_glibc", lambda: calls.append(1))  # must not even be looked up
    for k, v in env.items():
        fresh.setenv(k, v)
    t = heap.keep_cpu_heap()
    assert not t.applied and reason in t.reason and not calls


def test_an_unrelated_glibc_tunable_does_not_count_as_the_users_choice(fresh):
    fresh.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    fresh.setattr(heap, "_glibc", lambda: None)
    assert heap.keep_cpu_heap().reason.startswith("the C library is not glibc: nothing to tune")


def test_without_glibc_it_says_so(fresh):
    fresh.setattr(heap, "_glibc", lambda: None)
    t = heap.keep_cpu_heap()
    assert not t.applied and "not glibc" in t.reason


def test_a_bad_setting_is_one_line_that_says_what_to_do(fresh):
    fresh.setenv(heap.ENV, "fast")
    with pytest.raises(UserError, match=r"AGG2EXP_CPU_HEAP must be 'keep', 'keep-all' or 'default', got 'fast'; "
                                        r"unset it") as e:
        heap.keep_cpu_heap()
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"mode must be 'keep', 'keep-all' or 'default', got 'all'"):
        heap.keep_cpu_heap("all")
    fresh.delenv(heap.ENV)
    with pytest.raises(UserError, match="thresholds must be positive"):
        heap.keep_cpu_heap(mmap_threshold=0)
    assert heap._done is None  # nothing was set


def test_the_command_line_sets_it_and_a_bad_setting_exits_2(fresh, capsys):
    from engine import cli

    calls = []
    real = heap.keep_cpu_heap
    fresh.setattr(heap, "keep_cpu_heap", lambda: calls.append(1) or real())
    assert cli.main(["query", "list"]) == 0 and calls == [1]
    fresh.setattr(heap, "_done", None)
    fresh.setenv(heap.ENV, "fast")
    assert cli.main(["query", "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["agg2exp query: error: AGG2EXP_CPU_HEAP must be 'keep', 'keep-all' or 'default', got 'fast'; "
                   "unset it to keep the engine's heap settings"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are Linux's")
def test_keep_asks_pytorch_for_huge_pages_unless_told_otherwise(fresh):
    """``keep`` and ``keep-all`` set PyTorch's THP_MEM_ALLOC_ENABLE; a value already set wins, ``default``
    and a kernel without transparent huge pages leave it unset, and asking after PyTorch has read it
    says so, with the cure."""
    import os

    for mode in ("keep", "keep-all"):
        fresh.setattr(heap, "_done", None)
        t = heap.keep_cpu_heap(mode)
        assert os.environ[heap.THP_ENV] == "1" and t.huge_pages and "huge pages for blocks of 2 MiB" in t.reason
        fresh.delenv(heap.THP_ENV)
    fresh.setattr(heap, "_done", None)
    fresh.setenv(heap.THP_ENV, "0")
    t = heap.keep_cpu_heap()
    assert os.environ[heap.THP_ENV] == "0" and not t.huge_pages and "huge pages off (THP_MEM_ALLOC_ENABLE='0'" in t.reason
    fresh.setattr(heap, "_done", None)
    fresh.setenv(heap.THP_ENV, "1")  # inherited from a driver that asked
    t = heap.keep_cpu_heap()
    assert t.huge_pages and "huge pages on (THP_MEM_ALLOC_ENABLE=1 in the environment)" in t.reason
    fresh.delenv(heap.THP_ENV)
    fresh.setattr(heap, "_done", None)
    t = heap.keep_cpu_heap("default")
    assert heap.THP_ENV not in os.environ and not t.huge_pages and "huge" not in t.reason
    fresh.setattr(heap, "_done", None)
    fresh.setattr(heap, "_thp_policy", lambda: "never")
    t = heap.keep_cpu_heap()
    assert heap.THP_ENV not in os.environ and not t.huge_pages and "no transparent huge pages" in t.reason
    fresh.setattr(heap, "_done", None)
    fresh.setattr(heap, "_thp_policy", lambda: "madvise")
    fresh.setattr(heap, "huge_pages_in_effect", lambda: False)
    t = heap.keep_cpu_heap()
    assert not t.huge_pages and "asked too late" in t.reason and "THP_MEM_ALLOC_ENABLE=1 before Python starts" in t.reason


_THP_PROBE = textwrap.dedent("""
    import sys
    if sys.argv[1] == "late":
        import torch
        torch.ones(8)  # PyTorch reads its switch at the first tensor
    from engine.runtime.heap import huge_pages_in_effect, keep_cpu_heap
    tuning = keep_cpu_heap("keep") if sys.argv[1] != "none" else None
    print(huge_pages_in_effect(), None if tuning is None else tuning.huge_pages, None if tuning is None else tuning.reason)
""")


@pytest.mark.skipif(heap._thp_policy() != "madvise", reason="needs the kernel's transparent huge pages on madvise")
def test_in_a_fresh_process_a_large_tensor_lands_in_huge_pages():
    """After keep_cpu_heap a fresh process's 4 MiB tensor is in a mapping eligible for transparent huge
    pages; without it, or with it called after the first tensor (which the result says), it is not."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in (heap.ENV, heap.THP_ENV)}

    def run(case: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", _THP_PROBE, case], check=True, capture_output=True, text=True,
                             env=env).stdout
        return out.strip().splitlines()[-1].split(maxsplit=2)

    assert run("keep")[:2] == ["True", "True"]
    assert run("none")[:2] == ["False", "None"]
    late = run("late")
    assert late[:2] == ["False", "False"] and "asked too late" in late[2]
