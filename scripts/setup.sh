#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (Python 3.11, root or sudo) for bitrl-compile, idempotently:
#   Debian: the aarch64 cross compiler and binutils (rasp4/rasp5 targets), qemu-user (runs them here), zlib headers
#   Python: torch 2.13.0 CPU (from local disk where present), apache-tvm 0.27 with tvm-ffi pinned, the package
#           itself (editable) with its test extras
#   cache:  an aarch64 Python for qemu in ~/.cache/bitrl-compile (built once, about 20 s)
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

apt_packages=()
command -v aarch64-linux-gnu-g++ >/dev/null || apt_packages+=(g++-aarch64-linux-gnu)
command -v aarch64-linux-gnu-objdump >/dev/null || apt_packages+=(binutils-aarch64-linux-gnu)
command -v qemu-aarch64 >/dev/null || apt_packages+=(qemu-user)
[ -f /usr/include/zlib.h ] || apt_packages+=(zlib1g-dev)  # the C API (libbitrl) reads the artifact zip with zlib
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup: enabling Debian arm64 packages (for the emulated aarch64 Python)"
  $SUDO dpkg --add-architecture arm64
  need_update=1
fi
if [ ${#apt_packages[@]} -gt 0 ] || [ -n "${need_update:-}" ]; then
  echo "setup: apt-get install ${apt_packages[*]:-(update only)}"
  $SUDO apt-get update -qq
  if [ ${#apt_packages[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_packages[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
pip_quiet=(-q --disable-pip-version-check)
# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
$PY -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null \
  || $PY -m pip install "${pip_quiet[@]}" torch==2.13.0
# (Re)install when anything is missing or when the installed package is another checkout's.
$PY -c "import os, bitrl_compile.cli, grimp, hypothesis, importlinter, onnxruntime, psutil, stable_baselines3, tornado, bitrl_compile.runtime as r
assert os.path.samefile(os.path.dirname(bitrl_compile.__file__), 'bitrl_compile')
assert os.path.samefile(os.path.dirname(r.__file__), 'runtime')" 2>/dev/null \
  && $PY -m pip show apache-tvm-ffi 2>/dev/null | grep -x "Version: 0.1.14.post1" >/dev/null \
  || $PY -m pip install "${pip_quiet[@]}" -e ".[test]"

$PY -m bitrl_compile.cli emulator setup --tvm >/dev/null
echo "setup: ready ($($PY -c 'import tvm, torch; print("tvm", tvm.__version__, "torch", torch.__version__)' 2>/dev/null))"
