#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` (CPU only) for bench_vs_llama_server.py.
#
#   nice -n 19 benchmarks/build_llama_server.sh           # skips the build if the binary exists
#   nice -n 19 benchmarks/build_llama_server.sh --force   # rebuilds
#
# The sources are the llama.cpp tree vendored in llama-cpp-python's sdist (vendor/llama.cpp), the
# one thing a machine with only package registries can fetch. The build needs no network: no curl,
# no OpenSSL, and no web UI (neither built with npm nor downloaded prebuilt; the server then just
# has no page at /). Everything lives outside the repository:
#
#   ${LLAMA_SERVER_DIR:-$HOME/.cache/lmprog-bench}/
#       llama-server              the binary (static: it needs no libllama.so next to it)
#       llama-server.build-info   the version and cmake flags it was built with
#       src/, build/              the sdist and the build tree (safe to delete)
#
# ISA rule: on a CPU with `amx_tile`, GGML_NATIVE=OFF with AVX-512 (VNNI, BF16 if present), AVX2,
# FMA, F16C on and AMX off. llama.cpp's AMX kernels run tile instructions without first asking the
# kernel for tile state (arch_prctl ARCH_REQ_XCOMP_PERM), so on these machines they die with SIGILL,
# and a native build would turn them on. Any other CPU gets GGML_NATIVE=ON.
set -euo pipefail

VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DEST=${LLAMA_SERVER_DIR:-$HOME/.cache/lmprog-bench}
FORCE=0
case "${1:-}" in
    --force) FORCE=1 ;;
    "") ;;
    *) echo "usage: $0 [--force]   (got: $1)" >&2; exit 2 ;;
esac

if [[ -x "$DEST/llama-server" && $FORCE == 0 ]]; then
    echo "$DEST/llama-server is already built (pass --force to rebuild)"
    cat "$DEST/llama-server.build-info" 2>/dev/null || true
    exit 0
fi

# ---- ISA choice ------------------------------------------------------------------------------
cpu_flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has_flag() { [[ $cpu_flags == *" $1 "* ]]; }

if has_flag amx_tile; then
    bf16=OFF
    has_flag avx512_bf16 && bf16=ON
    isa="AVX-512 (VNNI, BF16=$bf16), AMX off: the CPU has AMX, which llama.cpp would SIGILL on"
    isa_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
               -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON "-DGGML_AVX512_BF16=$bf16"
               -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
else
    isa="native (no AMX on this CPU)"
    isa_flags=(-DGGML_NATIVE=ON)
fi
echo "ISA: $isa"
echo "     ${isa_flags[*]}"

# ---- sources and tools -----------------------------------------------------------------------
if ! command -v cmake >/dev/null; then
    echo "cmake not found; installing it from PyPI"
    python -m pip install --quiet cmake
fi
mkdir -p "$DEST/src"
sdist="$DEST/src/llama_cpp_python-$VERSION.tar.gz"
if [[ ! -f $sdist ]]; then
    echo "downloading the llama-cpp-python $VERSION sdist"
    python -m pip download --quiet --no-binary :all: --no-deps -d "$DEST/src" \
        "llama-cpp-python==$VERSION"
fi
src="$DEST/src/llama_cpp_python-$VERSION/vendor/llama.cpp"
[[ -f $src/CMakeLists.txt ]] || tar -xzf "$sdist" -C "$DEST/src"
[[ -f $src/CMakeLists.txt ]] || { echo "no vendor/llama.cpp in $sdist" >&2; exit 1; }

# ---- build -----------------------------------------------------------------------------------
build="$DEST/build"
rm -rf "$build"  # a stale cache would keep the ISA flags of an earlier run
cmake_flags=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF
             -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF
             -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
             -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
             -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
             "${isa_flags[@]}")
t0=$SECONDS
cmake -S "$src" -B "$build" "${cmake_flags[@]}" >"$DEST/cmake-configure.log" 2>&1 \
    || { tail -30 "$DEST/cmake-configure.log" >&2; exit 1; }
cmake --build "$build" --config Release --target llama-server -j "$(nproc)"
elapsed=$((SECONDS - t0))

install -m 755 "$build/bin/llama-server" "$DEST/llama-server"
{
    echo "llama.cpp from llama-cpp-python $VERSION, built $(date -u +%F) on $(nproc) cores"
    echo "ISA: $isa"
    echo "cmake ${cmake_flags[*]}"
} >"$DEST/llama-server.build-info"
echo "installed $DEST/llama-server; build took $((elapsed / 60)) min $((elapsed % 60)) s"
