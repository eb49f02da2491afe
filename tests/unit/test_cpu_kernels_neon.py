"""The AArch64 NEON (sdot) paths of the packed 4-bit and 8-bit matmuls, on a machine that cannot run
them: tests/native/quant_gemm_harness.cpp includes the kernel source without torch, is cross-compiled
with the neon level's flags (and, as a control, with none: the portable loops on the same CPU), and runs
under qemu-user; it checks every group and row tile against exact sums over the kernel's own int8
activations (1..33 rows, N and K off the block sizes). `make test` installs the cross compiler and
qemu-user-static (scripts/ensure_arm_toolchain.sh). On an AArch64 CPU with the dot-product extension
test_cpu_kernels_isa.py runs the neon level natively through torch as well."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from zili.kernels.cpu_isa import ISA_FLAGS, ISA_LEVEL_NUMBER

ROOT = Path(__file__).resolve().parents[2]
HARNESS = ROOT / "tests" / "native" / "quant_gemm_harness.cpp"
NATIVE = platform.machine() in ("aarch64", "arm64")
CASES = 18  # 9 shapes x (q4, q8), as the harness's main() lists them


def _tools() -> tuple[list[str], list[str]]:
    """The compiler command and the command prefix that runs its output (a static binary under qemu)."""
    if NATIVE:
        return [shutil.which("g++") or "g++"], []
    cxx = shutil.which("aarch64-linux-gnu-g++")
    qemu = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.fail("no AArch64 cross compiler or qemu-user: run `make test`, which installs them "
                    "(scripts/ensure_arm_toolchain.sh: g++-aarch64-linux-gnu, qemu-user-static)")
    return [cxx, "-static"], [qemu]


@pytest.mark.parametrize("isa", ["neon", "portable"])
def test_packed_matmuls_on_aarch64_match_exact_sums(isa, tmp_path):
    cxx, runner = _tools()
    binary = tmp_path / f"harness_{isa}"
    build = subprocess.run([*cxx, "-O2", "-std=c++17", *ISA_FLAGS[isa], f"-DZILI_OPS_NS=zili_cpu_{isa}",
                            str(HARNESS), "-o", str(binary)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=300)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert lines[0] == f"isa_level {ISA_LEVEL_NUMBER[isa]}"  # the flags reached the compiler
    assert sum(line.startswith("ok ") for line in lines) == CASES, run.stdout


def test_the_harness_catches_a_wrong_kernel(tmp_path):
    """The check has teeth: the neon source with the two nibble products' activations swapped fails."""
    cxx, runner = _tools()
    source = (ROOT / "src" / "zili" / "kernels" / "csrc" / "quant_gemm_cpu.cpp").read_text()
    right = "vdotq_s32(vdotq_s32(s[r][q], lo[q], xl), hi[q], xh)"
    assert source.count(right) == 1
    (tmp_path / "src" / "zili" / "kernels" / "csrc").mkdir(parents=True)
    (tmp_path / "tests" / "native").mkdir(parents=True)
    (tmp_path / "src" / "zili" / "kernels" / "csrc" / "quant_gemm_cpu.cpp").write_text(
        source.replace(right, "vdotq_s32(vdotq_s32(s[r][q], lo[q], xh), hi[q], xl)"))
    shutil.copy(HARNESS, tmp_path / "tests" / "native" / HARNESS.name)
    binary = tmp_path / "harness_wrong"
    build = subprocess.run([*cxx, "-O1", "-std=c++17", *ISA_FLAGS["neon"], "-DZILI_OPS_NS=zili_cpu_neon",
                            str(tmp_path / "tests" / "native" / HARNESS.name), "-o", str(binary)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([*runner, str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 1 and "MISMATCH q4" in run.stdout, run.stdout
