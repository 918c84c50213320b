"""The patched Caffe build itself: pycaffe, the CLI, the converters and the patches.

A tiny stock net's forward pass is checked against numpy, and `caffe time` runs on
BVLC AlexNet's deploy net from the unpacked source tree.
"""
import os
import subprocess

import numpy as np

import caffe
from caffe.proto import caffe_pb2

from dyve.tools import BIN_DIR, CAFFE_SOURCE_DIR, caffe_source_file, caffe_tool

TINY_NET = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 5 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 2
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 5
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
"""


def numpy_conv(x, w, b, stride, pad):
    """Direct convolution (cross-correlation, as Caffe) with zero padding."""
    num, channels, height, width = x.shape
    outputs, _, kh, kw = w.shape
    padded = np.zeros((num, channels, height + 2 * pad, width + 2 * pad))
    padded[:, :, pad:pad + height, pad:pad + width] = x
    out_h = (height + 2 * pad - kh) // stride + 1
    out_w = (width + 2 * pad - kw) // stride + 1
    out = np.zeros((num, outputs, out_h, out_w))
    for y in range(out_h):
        for x_ in range(out_w):
            patch = padded[:, :, y * stride:y * stride + kh, x_ * stride:x_ * stride + kw]
            out[:, :, y, x_] = np.tensordot(patch, w, axes=([1, 2, 3], [1, 2, 3])) + b
    return out


def test_tiny_stock_net_matches_numpy(tmp_path):
    path = tmp_path / "tiny.prototxt"
    path.write_text(TINY_NET)
    net = caffe.Net(str(path), caffe.TEST)
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, net.blobs["data"].data.shape)
    net.blobs["data"].data[...] = x
    net.forward()
    conv_w, conv_b = (p.data.astype(np.float64) for p in net.params["conv"])
    fc_w, fc_b = (p.data.astype(np.float64) for p in net.params["fc"])
    conv = np.maximum(numpy_conv(x.astype(np.float32).astype(np.float64), conv_w, conv_b, 2, 1), 0)
    assert net.blobs["conv"].data.shape == (2, 4, 3, 3)
    np.testing.assert_allclose(net.blobs["conv"].data, conv, rtol=1e-5, atol=1e-5)
    fc = conv.reshape(2, -1) @ fc_w.T + fc_b
    np.testing.assert_allclose(net.blobs["fc"].data, fc, rtol=1e-5, atol=1e-5)


def test_caffe_time_on_bvlc_alexnet():
    model = caffe_source_file("models", "bvlc_alexnet", "deploy.prototxt")
    result = subprocess.run([caffe_tool("caffe"), "time", "-model", model, "-iterations", "1"],
                            capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Average Forward pass" in result.stderr
    assert "fc8\tforward:" in result.stderr


def test_tools_are_built_and_on_hand():
    for tool in ("caffe", "convert_imageset", "compute_image_mean", "upgrade_net_proto_text",
                 "convert_cifar_data", "python3"):
        assert os.access(os.path.join(BIN_DIR, tool), os.X_OK), tool
    version = subprocess.run([caffe_tool("caffe"), "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == "caffe version 1.0.0"
    # The converters refuse to run without arguments and print their usage.
    usage = subprocess.run([caffe_tool("convert_imageset")], capture_output=True, text=True)
    assert usage.returncode == 1 and "Convert a set of images to the leveldb/lmdb" in usage.stdout
    usage = subprocess.run([caffe_tool("compute_image_mean")], capture_output=True, text=True)
    assert usage.returncode == 1 and "Compute the mean_image of a set of images" in usage.stdout


def test_patches_and_proto_extension_were_applied():
    # The protobuf >= 3.21 patch.
    with open(os.path.join(CAFFE_SOURCE_DIR, "src", "caffe", "util", "io.cpp")) as handle:
        assert "SetTotalBytesLimit(kProtoReadBytesLimit)" in handle.read()
    # caffe.proto extended: LayerParameter.dyve_param with its documented id.
    field = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name["dyve_param"]
    assert field.number == 1704
    assert field.message_type.name == "DyveParameter"
    # The overlay's layers are registered in the library.
    assert "DyveConvolution" in caffe.layer_type_list()
    assert "DyveInnerProduct" in caffe.layer_type_list()
    # pycaffe runs on Debian's python with its numpy 1.x, as the build requires.
    assert np.__version__.startswith("1.")
