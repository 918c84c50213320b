# DyVE-Caffe in a container: Debian 12 with the patched Caffe built by the Makefile's
# recipe (`make deps build`), never a second one here. See README.md, section "Docker".
#
#   docker build --network host -t dyve-caffe .
#   docker run --rm --network host -v /path/to/data:/data:ro \
#       -v "$PWD/reports:/opt/dyve-caffe/reports" dyve-caffe          # make reproduce
#
# Layers, so that editing the Python tooling (python/, prototxt/, models/, tests/, docs/)
# rebuilds nothing but the last COPY:
#   1. Debian packages: redone only when scripts/install_deps.sh changes;
#   2. Caffe (fetch Debian's source, patch, build): redone when the Makefile, scripts/ or
#      caffe_dyve/ change;
#   3. the rest of the tree.
FROM debian:bookworm

WORKDIR /opt/dyve-caffe

# 1. The Debian packages: the list and the script that `make deps` runs (it calls
#    apt-get update itself), plus make, which the base image lacks.
COPY scripts/install_deps.sh scripts/
RUN bash scripts/install_deps.sh \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends make \
 && apt-get clean && rm -rf /var/lib/apt/lists/*

# 2. The patched Caffe into build/. `make deps` only checks the packages now. The private
#    apt lists used to fetch Caffe's source (build/src/apt) are dropped; the source
#    package stays, so make never fetches again.
COPY Makefile ./
COPY scripts/ scripts/
COPY caffe_dyve/ caffe_dyve/
RUN make deps build && rm -rf build/src/apt

# 3. Everything else. COPY keeps the files' modification times, so build/'s stamps stay
#    newer than Makefile, scripts/ and caffe_dyve/ and `make build` redoes nothing.
COPY . .

# What `eval "$(make -s env)"` sets: build/bin (caffe, the converters, and python3 =
# Debian's /usr/bin/python3, which pycaffe is built for) first on PATH, pycaffe and dyve
# on PYTHONPATH. Datasets are read from /data (mount the folder holding
# cifar10-images.tar.gz or the official cifar-10-binary.tar.gz there; without it the
# official release is downloaded). Reports go to /opt/dyve-caffe/reports (mount a host
# folder there to keep them).
ENV PATH=/opt/dyve-caffe/build/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONPATH=/opt/dyve-caffe/build/caffe-src/python:/opt/dyve-caffe/python \
    DYVE_SHARED_DATA=/data

CMD ["make", "reproduce"]
