# DyVE-Caffe: one build recipe for the patched Caffe, the tests and the reproduction.
# Everything that is built lands in build/ (git-ignored). See README.md.

SHELL := /bin/bash
ROOT := $(abspath .)
BUILD := $(ROOT)/build
CAFFE_SRC := $(BUILD)/caffe-src
CAFFE_BUILD := $(BUILD)/caffe
BIN := $(BUILD)/bin
CAFFE_DSC := $(BUILD)/src/caffe_1.0.0+git20180821.99bd997-8.dsc
# pycaffe is built for, and must run with, Debian's Python and python3-numpy.
PYTHON := /usr/bin/python3
JOBS ?= $(shell nproc)

OVERLAY_SOURCES := $(shell find caffe_dyve -type f)
CAFFE_TARGETS := caffe.bin pycaffe convert_imageset compute_image_mean \
	upgrade_net_proto_text convert_cifar_data
TOOLS := tools/caffe tools/convert_imageset tools/compute_image_mean \
	tools/upgrade_net_proto_text examples/cifar10/convert_cifar_data

export PATH := $(BIN):$(PATH)
export PYTHONPATH := $(CAFFE_SRC)/python:$(ROOT)/python
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: all build deps fetch env test test-cpp test-python reproduce prototxt data-cifar10 \
	train-cifar10 docker-test clean onnx-venv kernel-bench bench-kernels test-asan ray-site

all: build

deps:
	@bash scripts/install_deps.sh

fetch: $(CAFFE_DSC)

$(CAFFE_DSC): scripts/fetch_caffe_source.py | deps
	@mkdir -p $(BUILD)/src
	$(PYTHON) scripts/fetch_caffe_source.py --dest $(BUILD)/src

# Unpacked, patched and overlaid source; only changed files are rewritten.
$(CAFFE_SRC)/.dyve-prepared: $(CAFFE_DSC) $(OVERLAY_SOURCES) scripts/prepare_caffe_source.py
	$(PYTHON) scripts/prepare_caffe_source.py --dsc $(CAFFE_DSC) --tree $(CAFFE_SRC) --overlay caffe_dyve
	@touch $@

# Rewritten by the preparation only when the overlay's file list changes.
$(CAFFE_SRC)/.dyve-overlay-files: $(CAFFE_SRC)/.dyve-prepared
	@:

# CMake runs again only when new files appear (Caffe's CMake globs sources).
$(CAFFE_BUILD)/CMakeCache.txt: $(CAFFE_SRC)/.dyve-overlay-files
	@mkdir -p $(CAFFE_BUILD)
	cd $(CAFFE_BUILD) && cmake $(CAFFE_SRC) -DCMAKE_BUILD_TYPE=Release \
	  -DCPU_ONLY=ON -DBLAS=Open -DUSE_OPENCV=ON -DUSE_LMDB=ON -DUSE_LEVELDB=OFF \
	  -DUSE_HDF5=ON -DBUILD_python=ON -DBUILD_python_layer=ON -Dpython_version=3 \
	  -DPYTHON_EXECUTABLE=$(PYTHON) -DBUILD_docs=OFF -DBUILD_matlab=OFF -Wno-dev
	@touch $@

build: $(CAFFE_BUILD)/CMakeCache.txt $(CAFFE_SRC)/.dyve-prepared
	$(MAKE) -C $(CAFFE_BUILD) -j$(JOBS) --no-print-directory $(CAFFE_TARGETS)
	@mkdir -p $(BIN)
	@for tool in $(TOOLS); do ln -sfn $(CAFFE_BUILD)/$$tool $(BIN)/$$(basename $$tool); done
	@ln -sfn $(PYTHON) $(BIN)/python3

# Prints the exports that put caffe, the converters and pycaffe + dyve on hand:
#   eval "$(make -s env)"
env:
	@echo 'export PATH="$(BIN):$$PATH"'
	@echo 'export PYTHONPATH="$(CAFFE_SRC)/python:$(ROOT)/python$${PYTHONPATH:+:$$PYTHONPATH}"'

test: test-cpp test-asan test-python

# The project's gtests plus the stock tests its patches could break.
test-cpp: build
	$(MAKE) -C $(CAFFE_BUILD) -j$(JOBS) --no-print-directory dyve_test.testbin
	cd $(CAFFE_SRC) && $(CAFFE_BUILD)/test/dyve_test.testbin --gtest_filter='-*GPU*'

# The DyVE gtests again under AddressSanitizer and UndefinedBehaviorSanitizer, in a
# build of their own (build/asan): an out-of-bounds read or a signed overflow in a knob's
# kernel fails the test run instead of passing by luck. Leak checking is off: Caffe's
# registries and glog hold their allocations until exit by design.
ASAN_BUILD := $(BUILD)/asan
SANITIZE := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer
$(ASAN_BUILD)/CMakeCache.txt: $(CAFFE_SRC)/.dyve-overlay-files
	@mkdir -p $(ASAN_BUILD)
	cd $(ASAN_BUILD) && cmake $(CAFFE_SRC) -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_CXX_FLAGS="$(SANITIZE)" -DCMAKE_EXE_LINKER_FLAGS="$(SANITIZE)" \
	  -DCMAKE_SHARED_LINKER_FLAGS="$(SANITIZE)" -DCPU_ONLY=ON -DBLAS=Open \
	  -DUSE_OPENCV=ON -DUSE_LMDB=ON -DUSE_LEVELDB=OFF -DUSE_HDF5=ON -DBUILD_python=OFF \
	  -DBUILD_python_layer=OFF -DBUILD_docs=OFF -DBUILD_matlab=OFF -Wno-dev
	@touch $@

test-asan: $(ASAN_BUILD)/CMakeCache.txt $(CAFFE_SRC)/.dyve-prepared
	$(MAKE) -C $(ASAN_BUILD) -j$(JOBS) --no-print-directory dyve_test.testbin
	cd $(CAFFE_SRC) && ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 \
	  $(ASAN_BUILD)/test/dyve_test.testbin --gtest_filter='*Dyve*:-*GPU*'

test-python: build data-cifar10 onnx-venv ray-site
	$(PYTHON) -m pytest -q tests

# Ray for the --ray backend of dyve.tune / dyve.bench (python/dyve/parallel.py), where
# Debian's Python sees it: the pinned Ray and its pinned dependencies, without numpy and
# protobuf (Debian's, which pycaffe needs), in build/ray-site. dyve puts that folder on
# sys.path itself when --ray is given; a cluster's `ray start` needs it on PYTHONPATH
# (README). Checked with pip check and an import beside pycaffe; redone only when
# scripts/ray_requirements.txt changes.
RAY_SITE := $(BUILD)/ray-site
RAY_REQUIREMENTS := scripts/ray_requirements.txt
ray-site: $(RAY_SITE)/.dyve-requirements

$(RAY_SITE)/.dyve-requirements: $(RAY_REQUIREMENTS) scripts/check_ray_site.py | build
	rm -rf $(RAY_SITE)
	$(PYTHON) -m pip install -q --no-deps --disable-pip-version-check --no-warn-script-location \
	  --target $(RAY_SITE) -r $(RAY_REQUIREMENTS)
	$(PYTHON) scripts/check_ray_site.py --site $(RAY_SITE) --requirements $(RAY_REQUIREMENTS)
	@cp $(RAY_REQUIREMENTS) $@

# onnx and ONNX Runtime (dyve.export_onnx, the ONNX Runtime column of dyve.bench) need a
# protobuf newer than pycaffe's, so they get a virtual environment of their own, made
# from Debian's Python, with the versions pinned in scripts/onnx_requirements.txt.
# dyve runs its Python as a worker process. Redone only when that file changes.
ONNX_VENV := $(BUILD)/onnx-venv
ONNX_REQUIREMENTS := scripts/onnx_requirements.txt
onnx-venv: $(ONNX_VENV)/.dyve-requirements

$(ONNX_VENV)/.dyve-requirements: $(ONNX_REQUIREMENTS) | deps
	rm -rf $(ONNX_VENV)
	$(PYTHON) -m venv $(ONNX_VENV)
	$(ONNX_VENV)/bin/python -m pip install -q --no-deps --disable-pip-version-check \
	  -r $(ONNX_REQUIREMENTS)
	$(ONNX_VENV)/bin/python -m pip check --disable-pip-version-check
	$(ONNX_VENV)/bin/python -c 'import onnx, onnxruntime; print("onnx-venv: onnx", \
	  onnx.__version__, "onnxruntime", onnxruntime.__version__)'
	@cp $(ONNX_REQUIREMENTS) $@

# The per-layer convolution kernel benchmark (docs/kernels.md): tools/kernel_bench.cpp
# times Caffe's im2col + OpenBLAS, oneDNN and libxsmm side by side; `make bench-kernels`
# runs scripts/kernel_bench.py, which adds the real layers (pycaffe) and ONNX Runtime.
KERNEL_BENCH_DEFS := $(if $(wildcard /usr/include/libxsmm.h),-DKERNEL_BENCH_LIBXSMM)
KERNEL_BENCH_LIBS := $(if $(wildcard /usr/include/libxsmm.h),-lxsmmext -lxsmm -lxsmmnoblas -ldl)
kernel-bench: $(BIN)/kernel_bench

$(BIN)/kernel_bench: tools/kernel_bench.cpp | deps
	@mkdir -p $(BIN)
	g++ -O2 -std=c++14 -fopenmp $(KERNEL_BENCH_DEFS) -o $@ $< -ldnnl $(KERNEL_BENCH_LIBS) \
	  -lopenblas -lpthread

bench-kernels: build kernel-bench data-cifar10
	$(PYTHON) scripts/kernel_bench.py $(KERNEL_BENCH_ARGS)

# CIFAR-10 to LMDB (data/cifar10) from $DYVE_SHARED_DATA (default ../shared/data): the
# offline image copy cifar10-images.tar.gz, else the official cifar-10-binary.tar.gz;
# with neither, the official release is downloaded and checksum-verified. Skips when up
# to date.
SHARED_DATA := $(or $(DYVE_SHARED_DATA),$(abspath $(ROOT)/../shared/data))
CIFAR10_IMAGES := $(wildcard $(SHARED_DATA)/cifar10-images.tar.gz)
CIFAR10_BINARY := $(wildcard $(SHARED_DATA)/cifar-10-binary.tar.gz)
CIFAR10_INPUT := $(if $(CIFAR10_IMAGES),--images $(CIFAR10_IMAGES),$(if \
	$(CIFAR10_BINARY),--binary $(CIFAR10_BINARY),--download))
data-cifar10: build
	$(PYTHON) -m dyve.data cifar10 $(CIFAR10_INPUT) > /dev/null

# Retrains the committed CIFAR-10 weights (models/); `make reproduce` never does.
train-cifar10: data-cifar10
	$(PYTHON) -m dyve.train cifar10_quick
	$(PYTHON) -m dyve.train cifar10_full

prototxt: build
	$(PYTHON) -m dyve.gen_prototxt --out-dir prototxt

# dlib's ImageNet ResNet-34 (docs/resnet34.md): fetched through apt from Debian's dlib
# source package (SHA-256-checked on every use), converted to Caffe in build/resnet34/,
# checked against dlib itself on the shared photos (reports/resnet34/conversion_check.json),
# then tuned on half of them and measured on the other half (reports/resnet34/).
# RESNET34_DYVE=0 stops after the check (about 5 min; the DyVE part about 20 more).
.PHONY: resnet34
RESNET34_DYVE ?= 1
RESNET34_IMAGES := $(SHARED_DATA)/imagenet-sample-dev
resnet34: build
	$(PYTHON) -m dyve.resnet34 convert
	$(PYTHON) -m dyve.resnet34 check --images $(RESNET34_IMAGES)
	$(if $(filter 0,$(RESNET34_DYVE)),,$(PYTHON) -m dyve.resnet34 dyve --images $(RESNET34_IMAGES))

# The main job: tune and measure (python/dyve/reproduce.py); reports/ and the table.
# RESNET34=1 adds dlib's ResNet-34 row (about 25 min more; `make resnet34` alone).
reproduce: build data-cifar10 onnx-venv
	$(PYTHON) -m dyve.reproduce $(if $(filter-out 0,$(RESNET34)),--resnet34)

# Builds the Docker image, runs `make reproduce` in it on ../shared/data (or
# $DYVE_DOCKER_DATA) and checks the reports and the printed table. Not part of `make test`.
docker-test:
	bash scripts/docker_test.sh

clean:
	rm -rf $(BUILD)
