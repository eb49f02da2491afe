#!/bin/sh
# The NEON kernel test (tests/unit/test_cpu_kernels_neon.py) cross-compiles the packed-matmul kernels for
# AArch64 and runs them under qemu-user; this installs Debian's cross compiler and qemu-user-static
# (about 63 MB, ~20 s) when they are missing. On an AArch64 machine nothing is needed: the kernel tests
# build and run the neon level natively. Without root and apt-get it says why; the test then fails
# with the same reason rather than passing without having run.
set -e
if [ "$(uname -m)" = aarch64 ] || [ "$(uname -m)" = arm64 ]; then
  exit 0
fi
if command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 && \
   { command -v qemu-aarch64-static >/dev/null 2>&1 || command -v qemu-aarch64 >/dev/null 2>&1; }; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_arm_toolchain: no AArch64 cross compiler or qemu-user and this is not root on a" \
       "Debian/Ubuntu system; install g++-aarch64-linux-gnu and qemu-user-static for the NEON kernel test." >&2
  exit 0
fi
echo "ensure_arm_toolchain: installing g++-aarch64-linux-gnu and qemu-user-static for the NEON kernel test" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user-static >/dev/null 2>&1 || {
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user-static >/dev/null
}
