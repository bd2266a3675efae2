import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# Allocate a 64 MiB block and free it; report whether tuning took and where malloc put the block:
# bytes served by mmap while it lived, and free bytes kept in the heap after the free (mallinfo2).
PROBE = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from mbm.alloc import tune_malloc

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Info
    tuned = tune_malloc() if sys.argv[1] == "tune" else False
    a = np.ones(16 << 20, np.float32)
    mapped = libc.mallinfo2().hblkhd
    del a
    print(tuned, mapped, libc.mallinfo2().fordblks)
""")
BLOCK = 64 << 20


def probe(mode: str, **env: str) -> tuple[bool, int, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0] == "True", int(out[1]), int(out[2])


def test_tuned_malloc_keeps_large_blocks_in_the_heap_for_reuse():
    tuned, mapped, kept = probe("tune")
    if not tuned:
        pytest.skip("not glibc")
    assert mapped < BLOCK  # served from the heap, not by a private mmap
    assert kept >= BLOCK  # and still there after the free: the next pass reuses it without page faults
    _, mapped, kept = probe("plain")
    assert mapped >= BLOCK  # glibc's default: its own mapping...
    assert kept < BLOCK  # ...returned to the kernel on free


def test_mbm_malloc_default_turns_it_off():
    tuned, mapped, kept = probe("tune", MBM_MALLOC="default")
    assert tuned is False
    assert mapped >= BLOCK and kept < BLOCK


def test_tune_malloc_is_idempotent():
    from mbm.alloc import tune_malloc

    assert tune_malloc() == tune_malloc()
