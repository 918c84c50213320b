#!/bin/bash
# Installs the Debian packages that the Caffe build and the tests need, only those
# missing, so a machine that has them all pays one dpkg-query.
set -euo pipefail

packages=(
  # toolchain and Debian source handling
  build-essential cmake dpkg-dev patch pkg-config ca-certificates
  # Caffe's dependencies (CPU_ONLY, OpenBLAS, OpenCV, LMDB, HDF5, pycaffe)
  libboost-filesystem-dev libboost-system-dev libboost-thread-dev libboost-python-dev
  libgflags-dev libgoogle-glog-dev libhdf5-dev liblmdb-dev libopenblas-dev
  libopencv-dev libprotobuf-dev protobuf-compiler libsnappy-dev
  # Debian's Python 3 with the numpy pycaffe is built against, and the project's tools
  python3 python3-dev python3-venv python3-numpy python3-protobuf python3-skimage python3-lmdb
  python3-pytest python3-matplotlib python3-tqdm python3-opencv python3-yaml
  python3-scipy python3-h5py
  # pip, for the pinned Ray that `make ray-site` installs beside Debian's numpy
  python3-pip
  # dlib, for converting its ImageNet ResNet-34 (tools/dlib_resnet34.cpp, docs/resnet34.md)
  libdlib-dev
  # oneDNN, the DyVE convolution's knobs-off kernel (docs/kernels.md; Caffe's im2col +
  # BLAS without it), and libxsmm, one of the candidates of tools/kernel_bench.cpp
  libdnnl-dev libxsmm-dev
)

missing=()
for package in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$package" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install_deps: all ${#packages[@]} Debian packages present"
  exit 0
fi

echo "install_deps: installing ${#missing[@]} missing packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  echo "install_deps: error: installing packages needs root; run 'sudo make deps' or install: ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -q; then
  echo "install_deps: error: 'apt-get update' failed; check /etc/apt/sources.list(.d) and the network to the Debian mirror" >&2
  exit 1
fi
if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
  echo "install_deps: error: 'apt-get install' failed for: ${missing[*]}" >&2
  echo "install_deps: these are Debian 12 (bookworm) package names; on another release install the equivalents by hand" >&2
  exit 1
fi
