#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench from the llama-cpp-python sdist on PyPI.
#
# Usage: scripts/build_llama_cpp.sh [VERSION]
#   VERSION      llama-cpp-python version (default 0.3.36, which vendors llama.cpp 0c1e57098)
# Environment:
#   ZILI_LLAMA_CPP_DIR   install root (default ${XDG_CACHE_HOME:-~/.cache}/zili/llama.cpp)
#   PIP                  pip command used to download the sdist (default: python3 -m pip)
#   JOBS                 parallel compile jobs (default: nproc)
#   NICE                 niceness of the compile (default 19: the machine is shared)
#   LLAMA_CPP_CMAKE_ARGS extra CMake arguments, after the defaults: e.g. an AVX2-only build on an
#                        AVX-512 machine, as a proxy for an AVX2 CPU (with its own ZILI_LLAMA_CPP_DIR):
#                        "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
#
# Idempotent: when <root>/<version>/bin/llama-server and llama-bench exist, it prints the bin dir
# and exits. The last line printed on stdout is always the bin directory.
set -euo pipefail

VERSION="${1:-0.3.36}"
ROOT="${ZILI_LLAMA_CPP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/zili/llama.cpp}"
PREFIX="$ROOT/$VERSION"
BIN="$PREFIX/bin"
PIP="${PIP:-python3 -m pip}"
JOBS="${JOBS:-$(nproc)}"
NICE="${NICE:-19}"

if [[ -x "$BIN/llama-server" && -x "$BIN/llama-bench" ]]; then
    echo "$BIN"
    exit 0
fi

WORK="$PREFIX/src"
mkdir -p "$WORK" "$BIN"
cd "$WORK"

SDIST="$(ls llama_cpp_python-"$VERSION".tar.gz 2>/dev/null || true)"
if [[ -z "$SDIST" ]]; then
    echo "downloading llama-cpp-python==$VERSION sdist" >&2
    $PIP download --no-deps --no-binary :all: --dest "$WORK" "llama-cpp-python==$VERSION" >&2
    SDIST="llama_cpp_python-$VERSION.tar.gz"
fi
if [[ ! -d "llama_cpp_python-$VERSION" ]]; then
    tar -xzf "$SDIST"
fi
LLAMA_SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -f "$LLAMA_SRC/CMakeLists.txt" ]] || { echo "no llama.cpp tree in the sdist at $LLAMA_SRC" >&2; exit 1; }

# The sdist has no git history: name the build after the package version.
GENERATOR=()
command -v ninja >/dev/null && GENERATOR=(-G Ninja)
nice -n "$NICE" cmake -S "$LLAMA_SRC" -B "$WORK/build" "${GENERATOR[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_COMMIT="llama-cpp-python-$VERSION" \
    -DLLAMA_BUILD_NUMBER=0 ${LLAMA_CPP_CMAKE_ARGS:-} >&2
nice -n "$NICE" cmake --build "$WORK/build" --config Release -j "$JOBS" \
    --target llama-server llama-bench >&2

cp "$WORK/build/bin/llama-server" "$WORK/build/bin/llama-bench" "$BIN/"
echo "llama-cpp-python $VERSION ($(date -u +%FT%TZ))" > "$PREFIX/BUILD_INFO"
echo "$BIN"
