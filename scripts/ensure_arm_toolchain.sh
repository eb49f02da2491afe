#!/bin/sh
# The NEON kernel test (tests/unit/test_cpu_kernels_neon.py) cross-compiles the packed-matmul kernels for
# AArch64 and runs them under qemu-user; this installs Debian's cross compiler and qemu-user-static
# (about 63 MB, ~20 s) when they are missing. On an AArch64 machine nothing is needed: the kernel tests
# build and run the neon level natively. Without root and apt-get it says why; the test then fails
# with the same reason rather than passing without having run.
set -e
case "$(uname -m)" in aarch64|arm64) exit 0 ;; esac
if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && \
   { command -v qemu-aarch64-static >/dev/null 2>&1 || command -v qemu-aarch64 >/dev/null 2>&1; }; then
  exit 0
fi
exec sh "$(dirname "$0")/apt_install.sh" ensure_arm_toolchain "the NEON kernel test" 0 \
  g++-aarch64-linux-gnu qemu-user-static
