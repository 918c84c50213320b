# DyVE-Caffe image: filled in by the `docker run` issue. The build recipe is the
# Makefile's (`make build`), never a second one here.
FROM debian:bookworm
WORKDIR /opt/dyve-caffe
COPY . .
RUN make deps build
CMD ["make", "reproduce"]
