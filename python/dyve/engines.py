"""The engines dyve.bench compares beside Caffe (caffe_io.forward): OpenCV's dnn module on
the stock prototxt, and the filler weights of the no-weights mode."""
import math

import numpy as np

from dyve.errors import BenchError

FILLER_SEED = 1704


def fill_weights(net, seed=FILLER_SEED):
    """Seeded filler values for parameter blobs that are all zero (deploy prototxts have
    no fillers): He-normal weights (std sqrt(2 / fan-in)), biases stay 0."""
    rng = np.random.RandomState(seed)
    for name, params in net.params.items():
        for i, blob in enumerate(params):
            if i == 0 and not blob.data.any():
                fan_in = int(np.prod(blob.data.shape[1:])) or 1
                blob.data[...] = rng.normal(0.0, math.sqrt(2.0 / fan_in),
                                            blob.data.shape).astype(np.float32)


def opencv_net(stock_path, weights, threads=None):
    """OpenCV dnn's net of a stock prototxt and a binary caffemodel, on the CPU."""
    import cv2
    if threads is not None:
        cv2.setNumThreads(int(threads))
    try:
        net = cv2.dnn.readNetFromCaffe(stock_path, weights)
    except cv2.error as error:
        raise BenchError(f"OpenCV dnn cannot read {stock_path} with {weights}: "
                         f"{str(error).strip()}") from None
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    return net


def opencv_forward(net, x):
    """Scores (a copy, N x classes) of OpenCV's net for the batch `x`."""
    net.setInput(x)
    return np.asarray(net.forward()).reshape(len(x), -1).copy()
