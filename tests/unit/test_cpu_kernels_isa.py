"""zili's ISA-dispatched CPU kernels (zili.kernels.cpu_isa): the level chosen from the CPU's flags
and lowered by ZILI_CPU_ISA, and every level this machine can execute (all three on an AVX-512 CPU)
checked against float64 references: packed 4-bit and 8-bit matmuls (odd shapes, 1..33 rows) and
the paged decode attention."""

from __future__ import annotations

import pytest
import torch

from zili.kernels import cpu_attention, cpu_isa
from zili.kernels.cpu_quant import dequantize_q4, dequantize_q8, pack_q4, pack_q8, q4_matmul, q8_matmul
from zili.platforms.cpu import CPU_ISA_LEVELS, executable_cpu_isas, native_cpu_isa
from zili.platforms.cpu import cpu_isa as selected_level

LEVELS = cpu_isa.executable_levels()
AVX2_FLAGS = frozenset({"sse2", "avx", "avx2", "fma", "f16c"})
AVX512_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
ARM_DOTPROD_FLAGS = frozenset({"fp", "asimd", "evtstrm", "aes", "crc32", "atomics", "fphp", "asimdhp", "asimdrdm",
                               "lrcpc", "dcpop", "asimddp"})  # a Neoverse N1's Features line


def test_level_comes_from_the_flags():
    assert native_cpu_isa(frozenset({"sse2"})) == "portable"
    assert native_cpu_isa(AVX2_FLAGS) == "avx2"
    assert native_cpu_isa(AVX2_FLAGS | {"avx512f", "avx512bw"}) == "avx2"  # no VNNI/BF16: Skylake-X
    assert native_cpu_isa(AVX512_FLAGS) == "avx512"
    assert executable_cpu_isas(AVX512_FLAGS) == ["portable", "avx2", "avx512"]
    # AArch64 ("Features" in /proc/cpuinfo): NEON with the dot-product extension, or the portable loops
    assert native_cpu_isa(ARM_DOTPROD_FLAGS) == "neon"
    assert executable_cpu_isas(ARM_DOTPROD_FLAGS) == ["portable", "neon"]
    assert native_cpu_isa(ARM_DOTPROD_FLAGS - {"asimddp"}) == "portable"  # Cortex-A72 (Graviton 1, Pi 4)
    assert LEVELS == [level for level in CPU_ISA_LEVELS if level in executable_cpu_isas()]


def test_env_forces_a_lower_level_and_refuses_a_higher_one(monkeypatch):
    monkeypatch.setenv("ZILI_CPU_ISA", "portable")
    assert selected_level(AVX512_FLAGS) == "portable"
    monkeypatch.setenv("ZILI_CPU_ISA", "AVX2")
    assert selected_level(AVX512_FLAGS) == "avx2"
    monkeypatch.setenv("ZILI_CPU_ISA", "avx512")
    with pytest.raises(ValueError, match="cannot run on this CPU \\(its level: 'avx2'.*avx512_vnni"):
        selected_level(AVX2_FLAGS)
    monkeypatch.setenv("ZILI_CPU_ISA", "neon")  # another architecture's level
    with pytest.raises(ValueError, match="ZILI_CPU_ISA=neon cannot run.*asimddp"):
        selected_level(AVX512_FLAGS)
    assert selected_level(ARM_DOTPROD_FLAGS) == "neon"
    monkeypatch.setenv("ZILI_CPU_ISA", "avx2")
    with pytest.raises(ValueError, match="its level: 'neon'"):
        selected_level(ARM_DOTPROD_FLAGS)
    monkeypatch.setenv("ZILI_CPU_ISA", "sse9")
    with pytest.raises(ValueError, match="ZILI_CPU_ISA must be one of portable, avx2, avx512, neon"):
        selected_level(AVX2_FLAGS)
    monkeypatch.delenv("ZILI_CPU_ISA")
    assert selected_level(AVX2_FLAGS) == "avx2"


@pytest.mark.parametrize("isa", LEVELS)
def test_each_level_builds_with_its_own_flags(isa):
    assert cpu_isa.load(isa)  # gcc and ninja are part of the set-up
    assert int(cpu_isa.ops(isa).isa_level()) == cpu_isa.ISA_LEVEL_NUMBER[isa]


def _quantize_rows_like_the_kernel(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] -> the float64 values the kernel multiplies by: int8 per block of 32 with
    d = max|x| / 127 (K zero-padded to a multiple of 32), the same fp32 arithmetic."""
    m, k = x.shape
    kb = -(-k // 32)
    xb = torch.nn.functional.pad(x.float(), (0, kb * 32 - k)).reshape(m, kb, 32)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q.double() * (amax / 127.0).double()).reshape(m, kb * 32)[:, :k]


SHAPES = [(1, 1, 32), (1, 7, 64), (2, 33, 96), (3, 64, 1000), (4, 5, 576), (5, 577, 256), (7, 32, 1536),
          (16, 9, 300), (33, 17, 160)]  # K not a multiple of 32 or 256, N odd, 1..33 rows


def _half_steps(x: torch.Tensor) -> torch.Tensor:
    """Per element, half the int8 step of its block of 32: the most its rounding can move it."""
    m, k = x.shape
    kb = -(-k // 32)
    amax = torch.nn.functional.pad(x.double().abs(), (0, kb * 32 - k)).reshape(m, kb, 32).amax(dim=-1)
    return (amax / 254.0).repeat_interleave(32, dim=1)[:, :k]


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """Tight against the exact product with the kernel's own int8 activations (only fp32
    accumulation differs); against the unquantized activations, within the int8 rounding's bound
    (sum over i of |w_i| times half a step of x_i's block)."""
    exact_q = _quantize_rows_like_the_kernel(x) @ w.double().t()
    exact = x.double() @ w.double().t()
    scale = exact.abs().max().clamp(min=1e-6)
    assert (got.double() - exact_q).abs().max() <= 1e-4 * scale
    bound = _half_steps(x) @ w.double().abs().t()
    assert ((got.double() - exact).abs() <= 1.01 * bound + 1e-4 * scale).all()


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_q4_matmul_matches_float64(isa, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    kb = -(-k // 32)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scale = torch.rand(n, kb, generator=gen) * 0.05
    minimum = torch.randn(n, kb, generator=gen) * 0.2  # asymmetric, like Q4_1 / Q4_K
    packed = pack_q4(codes, scale, minimum)
    w = dequantize_q4(packed)
    x = torch.randn(m, k, generator=gen)
    got = q4_matmul(x, packed, isa)
    assert got.shape == (m, n) and got.dtype == torch.float32
    _check(got, x, w)


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_q8_matmul_matches_float64(isa, m, n, k):
    gen = torch.Generator().manual_seed(m * 1000 + n + k + 1)
    weight = torch.randn(n, k, generator=gen)
    weight[0, :7] = -3.0  # negative codes at -127 and a repeated extreme
    packed = pack_q8(weight)
    w = dequantize_q8(packed)
    assert (w - weight).abs().max() <= weight.abs().max() / 127  # half a step of the largest block scale, and then some
    x = torch.randn(m, k, generator=gen)
    got = q8_matmul(x, packed, isa)
    assert got.shape == (m, n)
    _check(got, x, w)


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("m", [1, 3])  # one row (single-stream decode) and a 3-row tile
def test_bf16_activations_in_and_out(isa, m):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(40, 200, generator=gen)
    x = torch.randn(m, 200, generator=gen).bfloat16()
    for packed, matmul, dequantize in ((pack_q8(w), q8_matmul, dequantize_q8),
                                       (pack_q4(torch.randint(0, 16, (40, 200), generator=gen),
                                                torch.rand(40, 7, generator=gen) * 0.05,
                                                torch.randn(40, 7, generator=gen) * 0.2), q4_matmul, dequantize_q4)):
        got = matmul(x, packed, isa)
        assert got.dtype == torch.bfloat16
        # the kernel quantizes the bf16 activations exactly as their fp32 values
        ref = matmul(x.float(), packed, isa).double()
        assert (got.double() - ref).abs().max() <= 0.01 * ref.abs().max()
        exact = x.double() @ dequantize(packed).double().t()
        assert (got.double() - exact).abs().max() <= 0.03 * exact.abs().max()


def test_levels_agree_with_each_other():
    """Every level computes the same integer dot products: their results differ only by the order
    of fp32 additions."""
    gen = torch.Generator().manual_seed(11)
    packed = pack_q4(torch.randint(0, 16, (65, 576), generator=gen), torch.rand(65, 18, generator=gen) * 0.1,
                     torch.randn(65, 18, generator=gen) * 0.1)
    x = torch.randn(6, 576, generator=gen)
    outs = [q4_matmul(x, packed, isa) for isa in LEVELS]
    for other in outs[1:]:
        torch.testing.assert_close(other, outs[0], rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_clear_errors():
    packed = pack_q8(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="q8_gemm: qs must be uint8"):
        q8_matmul(torch.randn(2, 96), packed)
    with pytest.raises(ValueError, match="0..15"):
        pack_q4(torch.full((2, 32), 16), torch.ones(2, 1), torch.zeros(2, 1))


def test_zero_rows_and_zero_activations():
    packed = pack_q4(torch.randint(0, 16, (9, 64)), torch.rand(9, 2), torch.randn(9, 2))
    assert q4_matmul(torch.zeros(0, 64), packed).shape == (0, 9)
    assert torch.equal(q4_matmul(torch.zeros(2, 64), packed), torch.zeros(2, 9))


def _attention_reference(q, cache, tables, lens, scale):
    out = []
    bs = cache.shape[2]
    flat = cache.double().flatten(1, 2)
    for b, n in enumerate(lens):
        slots = torch.tensor([tables[b][s // bs] * bs + s % bs for s in range(n)])
        k, v = flat[0, slots], flat[1, slots]
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double() * scale, k), dim=-1)
        out.append(torch.einsum("hn,nhd->hd", w, v))
    return torch.stack(out)


@pytest.mark.parametrize("isa", LEVELS)
@pytest.mark.parametrize("dtype,d,block_size", [(torch.float32, 64, 16), (torch.float32, 24, 4),
                                                (torch.bfloat16, 64, 16), (torch.bfloat16, 128, 8)])
def test_paged_decode_matches_float64_on_every_level(isa, dtype, d, block_size):
    gen = torch.Generator().manual_seed(d + block_size)
    n_kv, group, num_blocks = 3, 3, 96
    lens = [1, 7, 8, 9, 33, 130]
    order, tables = torch.randperm(num_blocks, generator=gen).tolist(), []
    for n in lens:
        tables.append(order[: -(-n // block_size)])
        order = order[len(tables[-1]):]
    width = max(len(t) for t in tables)
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    cache = (torch.randn(2, num_blocks, block_size, n_kv, d, generator=gen) * 2).to(dtype)
    q = (torch.randn(len(lens), n_kv * group, d, generator=gen) * 2).to(dtype)
    scale = d ** -0.5
    want = _attention_reference(q, cache, tables, lens, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows in (slice(None), slice(5, 6)):  # work split by sequence, and by KV head
        got = cpu_attention.paged_decode(q[rows], cache, table_t[rows], torch.tensor(lens)[rows], scale, isa=isa)
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want[rows], atol=tol, rtol=tol)


@pytest.mark.parametrize("isa", LEVELS)
def test_serial_below_the_parallel_threshold_gives_the_same_bits(isa):
    """`set_parallel_min_bytes` only moves work between threads: a product or an attention call run on
    the calling thread alone (threshold above its size) equals, bit for bit, the one split over threads."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 96, generator=gen)
    p4 = pack_q4(torch.randint(0, 16, (200, 96), generator=gen), torch.rand(200, 3, generator=gen) / 8,
                 -torch.rand(200, 3, generator=gen))
    p8 = pack_q8(torch.randn(200, 96, generator=gen))
    cache = torch.randn(2, 4, 16, 3, 64, generator=gen)
    q, tables, lens = torch.randn(1, 9, 64, generator=gen), torch.tensor([[2, 0, 3]]), torch.tensor([40])

    def run():
        return (q4_matmul(x, p4, isa=isa), q8_matmul(x, p8, isa=isa),
                cpu_attention.paged_decode(q, cache, tables, lens, 0.125, isa=isa))

    previous = cpu_isa.set_parallel_min_bytes(0, isa)
    try:
        with torch.inference_mode():
            split = run()
            assert cpu_isa.set_parallel_min_bytes(1 << 40, isa) == 0
            alone = run()
    finally:
        cpu_isa.set_parallel_min_bytes(previous, isa)
    for a, b in zip(split, alone):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="nbytes must be a non-negative integer"):
        cpu_isa.set_parallel_min_bytes(-1, isa)


def test_a_killed_builds_lock_file_does_not_block_the_next_load(tmp_path):
    """torch's build `lock` left by a killed build is removed under zili's own (flock) lock, and the
    flock itself excludes a second builder while the first holds it."""
    import fcntl
    import subprocess
    import sys

    from zili.kernels.cpu_isa import _build_lock

    probe = ("import fcntl, sys\nwith open(sys.argv[1]) as h:\n    try:\n        fcntl.flock(h, fcntl.LOCK_EX | "
             "fcntl.LOCK_NB)\n    except BlockingIOError:\n        sys.exit(3)")
    (tmp_path / "lock").touch()  # what a build killed mid-way leaves behind
    with _build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()
        other = subprocess.run([sys.executable, "-c", probe, str(tmp_path / ".zili-build.flock")])
        assert other.returncode == 3  # another process cannot take the build lock meanwhile
    with open(tmp_path / ".zili-build.flock") as handle:  # released afterwards
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
