#!/usr/bin/env bash
# Fills benchmarks/gpu/carry/ (git-ignored) with what the lent GPU machine lacks, as files the
# device tool carries (64 MiB at most per call; this comes to about 22 MiB):
#   flashinfer.tar.xz    flashinfer-python's files, re-packed (the 62 MB wheel is too big raw)
#   *.whl                apache-tvm-ffi (cp312, what FlashInfer's kernels load through) and gguf
# Run here, where PyPI is reachable:  bash benchmarks/gpu/prepare_carry.sh
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p carry && cd carry
FLASHINFER=0.7.2.post1 TVM_FFI=0.1.15.post2
pip="python -m pip download -q --no-deps --only-binary=:all: -d ."
platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
$pip --python-version 3.12 --implementation cp $platforms "apache-tvm-ffi==$TVM_FFI"
$pip --python-version 3.12 "gguf>=0.10"
if [ ! -f flashinfer.tar.xz ]; then
  tmp=$(mktemp -d)
  python -m pip download -q --no-deps -d "$tmp" "flashinfer-python==$FLASHINFER"
  (cd "$tmp" && unzip -q flashinfer_python-*.whl -d site && tar -C site -cf - . | xz -6 -T2 > flashinfer.tar.xz)
  mv "$tmp/flashinfer.tar.xz" .
  rm -rf "$tmp"
fi
ls -la
du -sh .
