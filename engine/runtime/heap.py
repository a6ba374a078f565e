"""The CPU heap of a process that runs the engine: glibc's malloc told to keep window-sized buffers.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a request above its
*mmap threshold* with fresh pages from the kernel, and hands the top of its heap back once more
than its *trim threshold* lies free there. Both start small (128 KiB) and rise only as large
blocks are freed, so how a process's first few windows happen to allocate decides whether its
window-sized buffers (0.3-20 MB: activations, gradients, seeds) are reused or faulted in afresh,
page by page, at every forward and VJP. Measured on the demo UNet in fresh processes (BENCHMARKS.md,
"The CPU heap"): SmoothGrad ran 1.31x slower in every process, and saliency 1.5x slower in a third of
them, a speed fixed for the life of the process. The maps are bitwise the same either way.

:func:`keep_cpu_heap` fixes both thresholds (``mallopt``): blocks below 32 MiB come from the heap
and freed memory stays in the process up to 64 MiB at the heap's top, so the buffers of one
window are reused by the next. Larger blocks (whole volumes, maps of a CT) are still mapped and
returned to the system when freed. Setting only one of the two is worse than neither (setting
either stops glibc's own adjustment, measured).

Windows whose tensors pass 32 MiB (glibc's largest mmap threshold; e.g. a 17-channel activation of a
96^3 window) are still mapped and faulted in at every use. ``keep-all`` (``AGG2EXP_CPU_HEAP=keep-all``)
maps no block at all and keeps up to 1 GiB free at the heap's top: on the demo UNet at 96^3 windows
saliency ran 2.16x faster, with an 18% higher peak memory on one 96^3 volume, and about 2.5x the
resident memory over a run of larger volumes (1.9 GB against 0.7-0.8 GB; BENCHMARKS.md). It is opt-in for that price. On a cluster, a
job's ``[runtime] cpu_heap`` sets it for every worker; else set the variable where the workers start.

Blocks above 32 MiB are still faulted in page by page under ``keep``. So ``keep`` and ``keep-all`` also
ask PyTorch's CPU allocator for transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``, PyTorch's own
switch: blocks of 2 MiB and more are aligned to 2 MiB and advised ``MADV_HUGEPAGE``), so a mapped block
is faulted in 2 MiB at a time instead of 4 KiB. On the demo UNet at 96^3 windows saliency then ran
1.41x faster on a one-window volume under ``keep`` (``keep-all``: 1.48x) with the same peak memory
(1253 against 1264 MB; ``keep-all`` 1801 MB), and 1.38x on a 12-window volume, with 4% more peak and
7% more resident memory after it (BENCHMARKS.md); at the demo's 48 x 40 x 40 windows it changed
nothing. PyTorch reads the switch once, at the process's first CPU tensor: asked after that it cannot
take effect, and the result says so. A ``THP_MEM_ALLOC_ENABLE`` already in the environment (the user's,
or inherited from a driver that asked) wins; where the kernel has transparent huge pages off
(``never``) nothing is asked.

The engine's workers call it when they start, and so does the ``agg2exp`` command; a library
user may call it once at the start of a process. It does nothing (and says why) where the C
library is not glibc, where the user has set glibc's own variables for these thresholds
(``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``MALLOC_MMAP_MAX_`` or
their ``GLIBC_TUNABLES``: theirs win), or where ``AGG2EXP_CPU_HEAP=default`` asks for
the C library's defaults.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from dataclasses import dataclass, replace

from engine.errors import UserError

log = logging.getLogger(__name__)

#: ``mallopt`` parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4

MIB = 1 << 20
#: glibc's largest accepted mmap threshold on 64-bit systems (half its 64 MiB heap size).
MMAP_THRESHOLD = 32 * MIB
TRIM_THRESHOLD = 64 * MIB
#: ``keep-all``: what the heap keeps free at its top when no block is mapped.
ALL_TRIM_THRESHOLD = 1024 * MIB
#: The accepted modes (``AGG2EXP_CPU_HEAP``, or :func:`keep_cpu_heap`'s ``mode``).
MODES = ("keep", "keep-all", "default")
#: PyTorch's switch for transparent huge pages in its CPU allocator (read once per process).
THP_ENV = "THP_MEM_ALLOC_ENABLE"
_THP_POLICY = "/sys/kernel/mm/transparent_hugepage/enabled"

#: The environment variable that chooses the mode: ``keep`` (the default), ``keep-all`` or ``default``.
ENV = "AGG2EXP_CPU_HEAP"
_GLIBC_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_GLIBC_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold", "glibc.malloc.top_pad",
                   "glibc.malloc.mmap_max")


class HeapSettingError(UserError, ValueError):
    """``AGG2EXP_CPU_HEAP`` or a threshold that cannot be used."""


@dataclass(frozen=True)
class HeapTuning:
    """What :func:`keep_cpu_heap` did: ``applied``, or ``reason`` why not."""

    applied: bool
    reason: str
    mmap_threshold: int | None = None
    trim_threshold: int | None = None
    mmap_max: int | None = None  # 0 under keep-all: no block is mapped
    huge_pages: bool = False  # PyTorch allocates blocks of 2 MiB and more in transparent huge pages


_done: HeapTuning | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None  # musl and others: no glibc malloc to tune
    return libc


def _thp_policy() -> str | None:
    """The kernel's transparent-huge-page policy (``always``, ``madvise`` or ``never``), None where unknown."""
    try:
        with open(_THP_POLICY) as f:
            text = f.read()
    except OSError:
        return None
    chosen = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
    return chosen[0] if chosen else None


def huge_pages_in_effect() -> bool | None:
    """Whether this process's PyTorch places a large CPU block in transparent huge pages: the mapping
    that holds a fresh 4 MiB tensor is eligible for them (``THPeligible`` in ``/proc/self/smaps``).
    None where that cannot be read (not Linux)."""
    import torch

    block = torch.empty(4 * MIB, dtype=torch.uint8)
    addr = block.data_ptr()
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(maxsplit=1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(v, 16) for v in head.split("-"))
                    inside = lo <= addr < hi
                elif inside and head == "THPeligible:":
                    return line.split()[1] == "1"
    except (OSError, ValueError):
        return None
    return None


def _ask_huge_pages() -> tuple[bool, str]:
    """Ask PyTorch for transparent huge pages (see the module's docstring): whether they are in
    effect, and a phrase for :attr:`HeapTuning.reason`."""
    if THP_ENV in os.environ:  # the user's, or inherited from a process that asked (a Ray driver)
        value = os.environ[THP_ENV].strip()
        if value in ("", "0"):
            return False, f"huge pages off ({THP_ENV}={value!r} in the environment)"
        on = f"huge pages on ({THP_ENV}={value} in the environment)"
    else:
        policy = _thp_policy()
        if policy in (None, "never"):
            return False, "no transparent huge pages on this system"
        os.environ[THP_ENV] = "1"
        on = "huge pages for blocks of 2 MiB and more"
    # PyTorch reads the switch at its first CPU tensor: before torch is imported that is still to come
    if "torch" in sys.modules and huge_pages_in_effect() is False:
        return False, (f"huge pages asked too late (a tensor came first): set {THP_ENV}=1 before Python starts, "
                       "or call keep_cpu_heap first")
    return True, on


def keep_cpu_heap(mode: str | None = None, *, mmap_threshold: int = MMAP_THRESHOLD,
                  trim_threshold: int | None = None) -> HeapTuning:
    """Set glibc's heap for this process (once; later calls return the first result). ``mode``:
    ``keep`` (the default: blocks below ``mmap_threshold`` from the heap, ``trim_threshold`` 64 MiB),
    ``keep-all`` (every block from the heap, none mapped, 1 GiB kept free at the top: for windows whose
    tensors pass 32 MiB, e.g. 96^3 and larger, at the price of a higher peak memory) or ``default``;
    None reads ``AGG2EXP_CPU_HEAP`` (``keep`` when unset). ``keep`` and ``keep-all`` also ask PyTorch
    for transparent huge pages on Linux (``huge_pages`` in the result; call it before the process's
    first tensor). Never raises for the platform: it returns why it did nothing."""
    global _done
    if _done is not None:
        return _done
    raw = os.environ.get(ENV, "keep") if mode is None else mode
    choice = str(raw).strip().lower()
    if choice not in MODES:
        advice = "unset it to keep the engine's heap settings" if mode is None else "pass one of them, or None to read " + ENV
        raise HeapSettingError(f"{ENV if mode is None else 'mode'} must be 'keep', 'keep-all' or 'default', "
                               f"got {raw!r}; {advice}")
    trim = (ALL_TRIM_THRESHOLD if choice == "keep-all" else TRIM_THRESHOLD) if trim_threshold is None else trim_threshold
    if mmap_threshold <= 0 or trim <= 0:
        raise HeapSettingError(f"thresholds must be positive, got mmap {mmap_threshold} and trim {trim}")
    user = [v for v in _GLIBC_VARS if v in os.environ]
    if any(t in os.environ.get("GLIBC_TUNABLES", "") for t in _GLIBC_TUNABLES):
        user.append("GLIBC_TUNABLES")
    libc = None if choice == "default" or user else _glibc()
    if choice == "default":
        _done = HeapTuning(False, f"{ENV + '=default' if mode is None else 'mode default'}: the C library's own "
                                  "thresholds")
    elif user:
        _done = HeapTuning(False, f"left to the user's {', '.join(user)}")
    elif libc is None:
        _done = HeapTuning(False, "the C library is not glibc: nothing to tune")
    else:
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        ok = libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, int(trim)) == 1
        mmap_max = 0 if choice == "keep-all" else None
        ok = ok and (mmap_max is None or libc.mallopt(M_MMAP_MAX, mmap_max) == 1)
        what = "glibc thresholds set" + (", no block mapped" if mmap_max == 0 else "")
        _done = (HeapTuning(True, what, mmap_threshold, trim, mmap_max) if ok
                 else HeapTuning(False, "glibc refused the thresholds (mallopt returned 0)"))
    if choice != "default" and sys.platform.startswith("linux"):
        huge, phrase = _ask_huge_pages()
        _done = replace(_done, huge_pages=huge, reason=f"{_done.reason}; {phrase}")
    log.debug("CPU heap: %s", _done.reason)
    return _done
