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


# Four threads allocate while all of them live; glibc's malloc_stats prints one "Arena N:" block per arena.
ARENAS = textwrap.dedent("""
    import ctypes, os, sys, threading
    import numpy as np
    from mbm.alloc import limit_arenas

    limited = limit_arenas() if sys.argv[1] == "limit" else False
    kept, together = [], threading.Barrier(4)
    def work():
        together.wait()
        kept.append(np.ones(4096))
        together.wait()  # an ended thread's arena would go to the next one
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(limited, os.environ.get("MALLOC_ARENA_MAX"), flush=True)
    ctypes.CDLL("libc.so.6").malloc_stats()
""")


def arenas(mode: str, **env: str) -> tuple[bool, str, int]:
    base = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    done = subprocess.run([sys.executable, "-c", ARENAS, mode], capture_output=True, text=True, check=True,
                          env={**base, **env})
    limited, value = done.stdout.split()
    return limited == "True", value, done.stderr.count("Arena ")


def test_limit_arenas_keeps_threads_to_one_arena_here_and_in_child_processes():
    limited, value, n = arenas("limit")
    if not limited:
        pytest.skip("not glibc")
    assert value == "1"  # children started from here read it at their start
    assert n == 1
    _, value, n = arenas("plain")
    assert value == "None"
    assert n >= 3  # glibc's default: a new arena for each new thread, up to 8 per core
    _, _, n = arenas("plain", MALLOC_ARENA_MAX="1")  # what a started child gets
    assert n == 1


def test_limit_arenas_keeps_a_value_the_user_set_and_mbm_malloc_default_skips_it():
    limited, value, n = arenas("limit", MALLOC_ARENA_MAX="2")
    if not limited:
        pytest.skip("not glibc")
    assert value == "2" and n == 2
    limited, value, _ = arenas("limit", MBM_MALLOC="default")
    assert limited is False and value == "None"


# 3,000 blocks of 64 KiB (below glibc's mmap threshold: in the heap), all freed but the last, which pins
# the heap's top so that free() alone cannot shrink it; resident MiB before and after a Trimmer ran.
TRIM = textwrap.dedent("""
    import ctypes, os, sys, time
    from mbm.alloc import Trimmer

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 2**20

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 << 10) for _ in range(3000)]
    for b in blocks:
        ctypes.memset(b, 1, 64 << 10)
    for b in blocks[:-1]:
        libc.free(b)
    before = rss()
    with Trimmer(interval=0.05):
        time.sleep(0.5)
    print(before, rss())
""")


def test_trimmer_returns_freed_heap_to_the_kernel():
    from mbm.alloc import _glibc

    if _glibc() is None:
        pytest.skip("not glibc")
    before, after = map(int, subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True,
                                            check=True).stdout.split())
    assert before >= 150  # 187 MiB freed but held: the heap cannot shrink past the last block
    assert after <= before - 150
    before, after = map(int, subprocess.run([sys.executable, "-c", TRIM], capture_output=True, text=True, check=True,
                                            env={**os.environ, "MBM_MALLOC": "default"}).stdout.split())
    assert after >= before - 10  # turned off with the other settings


def test_arena_env_sets_the_limit_for_started_processes_and_restores_the_environment(monkeypatch):
    from mbm.alloc import _glibc, arena_env

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    monkeypatch.delenv("MBM_MALLOC", raising=False)
    if _glibc() is None:
        pytest.skip("not glibc")
    with arena_env():
        child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_ARENA_MAX'))"],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert child == "1" and "MALLOC_ARENA_MAX" not in os.environ
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the user's value stays, during and after
    with arena_env():
        assert os.environ["MALLOC_ARENA_MAX"] == "4"
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    monkeypatch.setenv("MBM_MALLOC", "default")
    with arena_env():
        assert "MALLOC_ARENA_MAX" not in os.environ
