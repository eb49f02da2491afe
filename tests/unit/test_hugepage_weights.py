"""Packed CPU weights in huge-page memory (zili.kernels.cpu_quant.HugePageArena): the same bytes and
products as on the heap, in mappings advised MADV_HUGEPAGE, unmapped with their last tensor."""

from __future__ import annotations

import gc

import pytest
import torch

from zili.kernels import cpu_quant
from zili.kernels.cpu_quant import HugePageArena, huge_page_weights

pytestmark = pytest.mark.skipif(not HugePageArena.supported(), reason="no MADV_HUGEPAGE on this OS")


def _kernel_has_thp() -> bool:
    """Whether this kernel takes MADV_HUGEPAGE (one built without transparent huge pages refuses it)."""
    import mmap

    probe = mmap.mmap(-1, 2 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        probe.madvise(mmap.MADV_HUGEPAGE)
        return True
    except OSError:
        return False
    finally:
        probe.close()


KERNEL_HAS_THP = HugePageArena.supported() and _kernel_has_thp()


def mapping_flags(ptr: int) -> list[str] | None:
    """The VmFlags of the mapping of this process that holds address `ptr` (/proc/self/smaps), or None."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    return None


def _pack_all(gen: torch.Generator):
    codes = torch.randint(0, 16, (48, 200), generator=gen)
    scale, minimum = torch.rand(48, 7, generator=gen) * 0.05, torch.randn(48, 7, generator=gen) * 0.2
    w = torch.randn(40, 96, generator=gen)
    q8_codes, q8_d = torch.randint(-127, 128, (33, 64), generator=gen), torch.rand(33, 2, generator=gen).half()
    return (cpu_quant.pack_q4(codes, scale, minimum), cpu_quant.pack_q8(w), cpu_quant.pack_q8_codes(q8_codes, q8_d))


def test_packing_in_the_arena_gives_the_heaps_bytes_in_advised_memory():
    heap = _pack_all(torch.Generator().manual_seed(3))
    with huge_page_weights(True) as arena:
        assert arena is not None
        placed = _pack_all(torch.Generator().manual_seed(3))
    assert arena.advised == KERNEL_HAS_THP
    for a, b in zip(heap, placed):
        for name in ("qs", "dm" if hasattr(a, "dm") else "d"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x, y) and y.is_contiguous() and y.dtype == x.dtype, name
            assert y.data_ptr() % 64 == 0
            assert ("hg" in (mapping_flags(y.data_ptr()) or [])) == KERNEL_HAS_THP, name  # advised for huge pages
    x = torch.randn(3, 200)
    torch.testing.assert_close(cpu_quant.q4_matmul(x, placed[0]), cpu_quant.q4_matmul(x, heap[0]), rtol=0, atol=0)


def test_a_chunk_is_unmapped_with_its_last_tensor():
    with huge_page_weights(True):
        packed = cpu_quant.pack_q8(torch.randn(64, 64))
    ptr = packed.qs.data_ptr()
    assert mapping_flags(ptr) is not None
    del packed
    gc.collect()
    assert mapping_flags(ptr) is None


def test_large_tensors_get_their_own_chunk_and_small_ones_share_one():
    arena = HugePageArena(chunk_bytes=2 << 20)
    a, b = arena.empty((1000,), torch.uint8), arena.empty((10,), torch.float16)
    assert b.data_ptr() - a.data_ptr() == 1024  # bump allocation at 64-byte alignment
    big = arena.empty((3 << 20,), torch.uint8)  # larger than a chunk: a chunk of its own, rounded to 2 MiB
    assert arena.mapped_bytes == (2 << 20) + (4 << 20)
    assert arena.placed_bytes == 1000 + 20 + (3 << 20)
    big[-1] = 7  # writable to its last byte
    assert arena.empty((0, 5), torch.float32).shape == (0, 5)
    with pytest.raises(ValueError, match="chunk_bytes"):
        HugePageArena(chunk_bytes=12345)


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv("ZILI_HUGEPAGE_WEIGHTS", "0")
    with huge_page_weights() as arena:
        assert arena is None
        packed = cpu_quant.pack_q8(torch.randn(16, 32))
    calls = []
    monkeypatch.setattr(HugePageArena, "empty", lambda self, *a: calls.append(a))
    with huge_page_weights() as arena:
        cpu_quant.pack_q4(torch.randint(0, 16, (16, 32)), torch.rand(16, 1), torch.rand(16, 1))
    assert arena is None and calls == [] and packed.qs.shape[0] == 1  # nothing went through an arena
