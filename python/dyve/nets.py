"""Network definitions (pycaffe NetSpec) and their DyVE form.

One function per architecture returns a caffe_pb2.NetParameter for a `form`:

* ``"train_val"``: LMDB ``Data`` layers for TRAIN and TEST (transform_param as in the
  original recipe), the body, ``Accuracy`` (TEST; plus top-5 for the ImageNet nets) and
  ``SoftmaxWithLoss``.
* ``"deploy"``: an ``Input`` layer with the batch shape, the body without weight/bias
  fillers (as Caffe's deploy files: the weights come from a caffemodel), and a
  ``Softmax`` named "prob".

``dyve=None`` gives the stock net; a dict (``{}`` = all knobs off) gives the DyVE form, made
by dyve.rewrite.to_dyve from the stock NetParameter, so no architecture is written twice.
Paths in the train_val form are relative to the repository root (run Caffe from there).

Common keyword arguments of the net functions: `train_source` / `test_source` (LMDB
directories), `mean_file` (binaryproto), `batch_size` = (train, test) batch of the Data
layers, `deploy_batch` = batch dimension of the deploy Input (as Caffe's deploy files: 1
for CIFAR-10, 10 for the ImageNet nets; pass 1 for per-image inference).
"""
import caffe
from caffe import layers as L
from caffe import params as P
from caffe.proto import caffe_pb2
from google.protobuf import text_format

from dyve import rewrite

FORMS = ("train_val", "deploy")

CIFAR10_TRAIN_LMDB = "data/cifar10/cifar10_train_lmdb"
CIFAR10_TEST_LMDB = "data/cifar10/cifar10_test_lmdb"
CIFAR10_MEAN = "data/cifar10/mean.binaryproto"
IMAGENET_TRAIN_LMDB = "data/imagenet/ilsvrc12_train_lmdb"
IMAGENET_VAL_LMDB = "data/imagenet/ilsvrc12_val_lmdb"
IMAGENET_MEAN = "data/imagenet/mean.binaryproto"

# Learning-rate / decay multipliers of the weight and bias blobs.
_LR_1_2 = [dict(lr_mult=1), dict(lr_mult=2)]  # Caffe's CIFAR-10 examples
_LR_DECAY = [dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)]  # BVLC recipes


# --------------------------------------------------------------------------- helpers

def _check_form(form):
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")


def _data_layer(name, phase, source, batch_size, transform):
    """One LMDB Data layer (a LayerParameter) producing "data" and "label"."""
    layer = caffe_pb2.LayerParameter(name=name, type="Data", top=["data", "label"])
    layer.include.add(phase=phase)
    for key, value in transform.items():
        if isinstance(value, (list, tuple)):
            getattr(layer.transform_param, key).extend(value)
        else:
            setattr(layer.transform_param, key, value)
    layer.data_param.source = source
    layer.data_param.batch_size = batch_size
    layer.data_param.backend = caffe_pb2.DataParameter.LMDB
    return layer


def _input(n, form, deploy_shape):
    """The net's "data" Top. In train_val it stands for the two Data layers, which
    _finish puts in (NetSpec cannot express two layers with the same tops)."""
    if form == "deploy":
        n.data = L.Input(shape=dict(dim=list(deploy_shape)))
    else:
        n.data = L.Input(name="__data__")  # placeholder, replaced by _finish
    return n.data


def _finish(n, name, form, scores, data_layers, top5=False, dyve=None):
    """Add the head (loss/accuracy or prob), the data layers, strip fillers in deploy,
    and convert to the DyVE form when asked."""
    if form == "train_val":
        label = L.Input(name="__label__")  # stands for the Data layers' "label" top
        n.label = label
        n.accuracy = L.Accuracy(scores, label, include=dict(phase=caffe.TEST))
        if top5:
            n.accuracy_top5 = L.Accuracy(scores, label, include=dict(phase=caffe.TEST),
                                         accuracy_param=dict(top_k=5))
        n.loss = L.SoftmaxWithLoss(scores, label)
    else:
        n.prob = L.Softmax(scores)
    body = [layer for layer in n.to_proto().layer if layer.name not in ("__data__", "__label__")]
    if form == "train_val":
        body = list(data_layers) + body
    else:
        # Deploy files carry no fillers: the weights are loaded from a caffemodel.
        for layer in body:
            for field in ("convolution_param", "inner_product_param"):
                if layer.HasField(field):
                    getattr(layer, field).ClearField("weight_filler")
                    getattr(layer, field).ClearField("bias_filler")
    net = caffe_pb2.NetParameter(name=name)
    net.layer.extend(body)
    if dyve is not None:
        net = rewrite.to_dyve(net, dyve)
    return net


def _cifar10_data(name, train_source, test_source, mean_file, batch_size):
    """Data layers of Caffe's examples/cifar10 (mean file only: no crop, no mirror)."""
    transform = dict(mean_file=mean_file)
    return [_data_layer(name, caffe.TRAIN, train_source, batch_size[0], transform),
            _data_layer(name, caffe.TEST, test_source, batch_size[1], transform)]


def _imagenet_data(train_source, test_source, crop_size, batch_size, mean_file=None,
                   mean_value=()):
    """Data layers of models/bvlc_alexnet: random crop + mirror for TRAIN, centre crop
    and no mirror for TEST."""
    mean = dict(mean_file=mean_file) if mean_file else dict(mean_value=list(mean_value))
    return [_data_layer("data", caffe.TRAIN, train_source, batch_size[0],
                        dict(mirror=True, crop_size=crop_size, **mean)),
            _data_layer("data", caffe.TEST, test_source, batch_size[1],
                        dict(mirror=False, crop_size=crop_size, **mean))]


def _conv(bottom, num_output, kernel_size, std, bias=0.0, stride=1, pad=0, group=1,
          param=_LR_DECAY):
    """Convolution with a gaussian weight filler and a constant bias filler; only
    non-default geometry is written, as in the BVLC prototxts."""
    kw = dict(num_output=num_output, kernel_size=kernel_size)
    if pad:
        kw["pad"] = pad
    if stride != 1:
        kw["stride"] = stride
    if group != 1:
        kw["group"] = group
    return L.Convolution(bottom, param=param, **kw,
                         weight_filler=dict(type="gaussian", std=std),
                         bias_filler=dict(type="constant", value=bias))


def _fc(bottom, num_output, std, bias=0.0, param=_LR_DECAY):
    return L.InnerProduct(bottom, param=param, num_output=num_output,
                          weight_filler=dict(type="gaussian", std=std),
                          bias_filler=dict(type="constant", value=bias))


def _relu(bottom):
    return L.ReLU(bottom, in_place=True)


def _max_pool(bottom, kernel_size, stride):
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=kernel_size, stride=stride)


def _dropout(bottom):
    return L.Dropout(bottom, in_place=True, dropout_ratio=0.5)


# --------------------------------------------------------------------------- CIFAR-10

def cifar10_quick(form="train_val", dyve=None, train_source=CIFAR10_TRAIN_LMDB,
                  test_source=CIFAR10_TEST_LMDB, mean_file=CIFAR10_MEAN,
                  batch_size=(100, 100), deploy_batch=1):
    """Caffe's CIFAR-10 "quick" net, exactly examples/cifar10/cifar10_quick_train_test.prototxt
    (train_val) and cifar10_quick.prototxt (deploy) of BVLC Caffe 1.0.

    conv1(32,5x5,pad 2) -> max-pool 3/2 -> ReLU, conv2(32) -> ReLU -> ave-pool 3/2,
    conv3(64) -> ReLU -> ave-pool 3/2, ip1(64), ip2(10). Note ip1 has no ReLU in the
    original, so only conv1..conv3 are DyVE layers.
    """
    _check_form(form)
    n = caffe.NetSpec()
    data = _input(n, form, (deploy_batch, 3, 32, 32))

    def conv(bottom, num_output, std):
        # The CIFAR-10 examples give only lr_mult and a value-less constant bias filler.
        return L.Convolution(bottom, param=_LR_1_2, num_output=num_output, pad=2,
                             kernel_size=5, stride=1,
                             weight_filler=dict(type="gaussian", std=std),
                             bias_filler=dict(type="constant"))

    n.conv1 = conv(data, 32, 0.0001)
    n.pool1 = _max_pool(n.conv1, 3, 2)
    n.relu1 = _relu(n.pool1)
    n.conv2 = conv(n.relu1, 32, 0.01)
    n.relu2 = _relu(n.conv2)
    n.pool2 = L.Pooling(n.relu2, pool=P.Pooling.AVE, kernel_size=3, stride=2)
    n.conv3 = conv(n.pool2, 64, 0.01)
    n.relu3 = _relu(n.conv3)
    n.pool3 = L.Pooling(n.relu3, pool=P.Pooling.AVE, kernel_size=3, stride=2)
    n.ip1 = L.InnerProduct(n.pool3, param=_LR_1_2, num_output=64,
                           weight_filler=dict(type="gaussian", std=0.1),
                           bias_filler=dict(type="constant"))
    n.ip2 = L.InnerProduct(n.ip1, param=_LR_1_2, num_output=10,
                           weight_filler=dict(type="gaussian", std=0.1),
                           bias_filler=dict(type="constant"))
    data_layers = _cifar10_data("cifar", train_source, test_source, mean_file, batch_size)
    return _finish(n, "CIFAR10_quick", form, n.ip2, data_layers, dyve=dyve)


def cifar10_full(form="train_val", dyve=None, train_source=CIFAR10_TRAIN_LMDB,
                 test_source=CIFAR10_TEST_LMDB, mean_file=CIFAR10_MEAN,
                 batch_size=(100, 100), deploy_batch=1):
    """Caffe's CIFAR-10 "full" net (after cuda-convnet's layers-18pct), exactly
    examples/cifar10/cifar10_full_train_test.prototxt (train_val) and
    cifar10_full.prototxt (deploy) of BVLC Caffe 1.0.

    As the original: conv3 has no `param` specs, ip1's weights have decay_mult 250 and
    the LRN layers are WITHIN_CHANNEL.
    """
    _check_form(form)
    n = caffe.NetSpec()
    data = _input(n, form, (deploy_batch, 3, 32, 32))

    def conv(bottom, num_output, std, param=_LR_1_2):
        kw = dict(param=param) if param else {}
        return L.Convolution(bottom, num_output=num_output, pad=2, kernel_size=5, stride=1,
                             weight_filler=dict(type="gaussian", std=std),
                             bias_filler=dict(type="constant"), **kw)

    def lrn(bottom):
        return L.LRN(bottom, local_size=3, alpha=5e-05, beta=0.75,
                     norm_region=P.LRN.WITHIN_CHANNEL)

    n.conv1 = conv(data, 32, 0.0001)
    n.pool1 = _max_pool(n.conv1, 3, 2)
    n.relu1 = _relu(n.pool1)
    n.norm1 = lrn(n.relu1)
    n.conv2 = conv(n.norm1, 32, 0.01)
    n.relu2 = _relu(n.conv2)
    n.pool2 = L.Pooling(n.relu2, pool=P.Pooling.AVE, kernel_size=3, stride=2)
    n.norm2 = lrn(n.pool2)
    n.conv3 = conv(n.norm2, 64, 0.01, param=None)
    n.relu3 = _relu(n.conv3)
    n.pool3 = L.Pooling(n.relu3, pool=P.Pooling.AVE, kernel_size=3, stride=2)
    n.ip1 = L.InnerProduct(n.pool3, num_output=10,
                           param=[dict(lr_mult=1, decay_mult=250), dict(lr_mult=2, decay_mult=0)],
                           weight_filler=dict(type="gaussian", std=0.01),
                           bias_filler=dict(type="constant"))
    data_layers = _cifar10_data("cifar", train_source, test_source, mean_file, batch_size)
    return _finish(n, "CIFAR10_full", form, n.ip1, data_layers, dyve=dyve)


# --------------------------------------------------------------------------- ImageNet

def alexnet(form="train_val", dyve=None, train_source=IMAGENET_TRAIN_LMDB,
            test_source=IMAGENET_VAL_LMDB, mean_file=IMAGENET_MEAN,
            batch_size=(256, 50), deploy_batch=10):
    """AlexNet (Krizhevsky, Sutskever & Hinton, NIPS 2012) as BVLC Caffe's
    models/bvlc_alexnet/train_val.prototxt and deploy.prototxt: grouped conv2/4/5,
    LRN after relu1/relu2, overlapping 3/2 max-pools, dropout 0.5 on fc6/fc7, 227x227 crops.

    Only addition: a top-5 "accuracy_top5" layer in train_val (the paper reports top-5).
    """
    _check_form(form)
    n = caffe.NetSpec()
    data = _input(n, form, (deploy_batch, 3, 227, 227))

    def lrn(bottom):
        return L.LRN(bottom, local_size=5, alpha=0.0001, beta=0.75)

    n.conv1 = _conv(data, 96, 11, 0.01, stride=4)
    n.relu1 = _relu(n.conv1)
    n.norm1 = lrn(n.relu1)
    n.pool1 = _max_pool(n.norm1, 3, 2)
    n.conv2 = _conv(n.pool1, 256, 5, 0.01, bias=0.1, pad=2, group=2)
    n.relu2 = _relu(n.conv2)
    n.norm2 = lrn(n.relu2)
    n.pool2 = _max_pool(n.norm2, 3, 2)
    n.conv3 = _conv(n.pool2, 384, 3, 0.01, pad=1)
    n.relu3 = _relu(n.conv3)
    n.conv4 = _conv(n.relu3, 384, 3, 0.01, bias=0.1, pad=1, group=2)
    n.relu4 = _relu(n.conv4)
    n.conv5 = _conv(n.relu4, 256, 3, 0.01, bias=0.1, pad=1, group=2)
    n.relu5 = _relu(n.conv5)
    n.pool5 = _max_pool(n.relu5, 3, 2)
    n.fc6 = _fc(n.pool5, 4096, 0.005, bias=0.1)
    n.relu6 = _relu(n.fc6)
    n.drop6 = _dropout(n.relu6)
    n.fc7 = _fc(n.drop6, 4096, 0.005, bias=0.1)
    n.relu7 = _relu(n.fc7)
    n.drop7 = _dropout(n.relu7)
    n.fc8 = _fc(n.drop7, 1000, 0.01)
    data_layers = _imagenet_data(train_source, test_source, 227, batch_size, mean_file)
    return _finish(n, "AlexNet", form, n.fc8, data_layers, top5=True, dyve=dyve)


def overfeat_fast(form="train_val", dyve=None, train_source=IMAGENET_TRAIN_LMDB,
                  test_source=IMAGENET_VAL_LMDB, mean_file=IMAGENET_MEAN,
                  batch_size=(128, 50), deploy_batch=10):
    """OverFeat "fast" model: Sermanet et al., "OverFeat: Integrated Recognition,
    Localization and Detection using Convolutional Networks", ICLR 2014, Table 1.

    Implemented rows (layers 1-8, Table 1), 231x231 input:
      1 conv 96 11x11 stride 4, max-pool 2x2/2  -> 56x56 conv, 28x28 pooled
      2 conv 256 5x5 stride 1, max-pool 2x2/2   -> 24x24 conv, 12x12 pooled
      3 conv 512 3x3, zero-pad 1                -> 12x12
      4 conv 1024 3x3, zero-pad 1               -> 12x12
      5 conv 1024 3x3, zero-pad 1, max-pool 2x2/2 -> 12x12, 6x6 pooled
      6 full 3072, 7 full 4096, 8 full 1000 (output)
    No padding beyond the table's is needed: these are the published map sizes (the
    table's "spatial input size" 24x24 of layer 2 is its conv output; its input is 28x28).
    ReLU after every conv/full layer but the last, no contrast normalisation (the paper
    uses none), dropout 0.5 on layers 6 and 7 (Section 3). Layer names follow the paper's
    numbering (conv1..conv5, fc6..fc8). Training recipe (Section 3): batches of 128,
    weights N(0, 0.01); bias fillers constant 0 and Caffe's usual lr/decay multipliers are
    our choice. Train/test crops are 231x231 here (the table's input size) with mirroring.
    145,920,872 parameters (the paper: 145M).
    """
    _check_form(form)
    n = caffe.NetSpec()
    data = _input(n, form, (deploy_batch, 3, 231, 231))
    n.conv1 = _conv(data, 96, 11, 0.01, stride=4)
    n.relu1 = _relu(n.conv1)
    n.pool1 = _max_pool(n.relu1, 2, 2)
    n.conv2 = _conv(n.pool1, 256, 5, 0.01)
    n.relu2 = _relu(n.conv2)
    n.pool2 = _max_pool(n.relu2, 2, 2)
    n.conv3 = _conv(n.pool2, 512, 3, 0.01, pad=1)
    n.relu3 = _relu(n.conv3)
    n.conv4 = _conv(n.relu3, 1024, 3, 0.01, pad=1)
    n.relu4 = _relu(n.conv4)
    n.conv5 = _conv(n.relu4, 1024, 3, 0.01, pad=1)
    n.relu5 = _relu(n.conv5)
    n.pool5 = _max_pool(n.relu5, 2, 2)
    n.fc6 = _fc(n.pool5, 3072, 0.01)
    n.relu6 = _relu(n.fc6)
    n.drop6 = _dropout(n.relu6)
    n.fc7 = _fc(n.drop6, 4096, 0.01)
    n.relu7 = _relu(n.fc7)
    n.drop7 = _dropout(n.relu7)
    n.fc8 = _fc(n.drop7, 1000, 0.01)
    data_layers = _imagenet_data(train_source, test_source, 231, batch_size, mean_file)
    return _finish(n, "OverFeat_fast", form, n.fc8, data_layers, top5=True, dyve=dyve)


def overfeat_accurate(form="train_val", dyve=None, train_source=IMAGENET_TRAIN_LMDB,
                      test_source=IMAGENET_VAL_LMDB, mean_file=IMAGENET_MEAN,
                      batch_size=(128, 50), deploy_batch=10):
    """OverFeat "accurate" model: Sermanet et al., "OverFeat: Integrated Recognition,
    Localization and Detection using Convolutional Networks", ICLR 2014, Table 3.

    Implemented rows (layers 1-9, Table 3), 221x221 input:
      1 conv 96 7x7 stride 2, max-pool 3x3/3    -> 108x108 conv, 36x36 pooled
      2 conv 256 7x7 stride 1, max-pool 2x2/2   -> 30x30 conv, 15x15 pooled
      3 conv 512 3x3, zero-pad 1                -> 15x15
      4 conv 512 3x3, zero-pad 1                -> 15x15
      5 conv 1024 3x3, zero-pad 1               -> 15x15
      6 conv 1024 3x3, zero-pad 1, max-pool 3x3/3 -> 15x15, 5x5 pooled
      7 full 4096, 8 full 4096, 9 full 1000 (output)
    The table's padding alone gives its published map sizes (36, 15, 5), so no extra
    padding. ReLU after every conv/full layer but the last, no normalisation, dropout 0.5
    on the two hidden full layers (7 and 8). Layer names follow the paper's numbering
    (conv1..conv6, fc7..fc9). Recipe choices as for :func:`overfeat_fast`; 221x221 crops.
    144,656,488 parameters (the paper: 144M).
    """
    _check_form(form)
    n = caffe.NetSpec()
    data = _input(n, form, (deploy_batch, 3, 221, 221))
    n.conv1 = _conv(data, 96, 7, 0.01, stride=2)
    n.relu1 = _relu(n.conv1)
    n.pool1 = _max_pool(n.relu1, 3, 3)
    n.conv2 = _conv(n.pool1, 256, 7, 0.01)
    n.relu2 = _relu(n.conv2)
    n.pool2 = _max_pool(n.relu2, 2, 2)
    n.conv3 = _conv(n.pool2, 512, 3, 0.01, pad=1)
    n.relu3 = _relu(n.conv3)
    n.conv4 = _conv(n.relu3, 512, 3, 0.01, pad=1)
    n.relu4 = _relu(n.conv4)
    n.conv5 = _conv(n.relu4, 1024, 3, 0.01, pad=1)
    n.relu5 = _relu(n.conv5)
    n.conv6 = _conv(n.relu5, 1024, 3, 0.01, pad=1)
    n.relu6 = _relu(n.conv6)
    n.pool6 = _max_pool(n.relu6, 3, 3)
    n.fc7 = _fc(n.pool6, 4096, 0.01)
    n.relu7 = _relu(n.fc7)
    n.drop7 = _dropout(n.relu7)
    n.fc8 = _fc(n.drop7, 4096, 0.01)
    n.relu8 = _relu(n.fc8)
    n.drop8 = _dropout(n.relu8)
    n.fc9 = _fc(n.drop8, 1000, 0.01)
    data_layers = _imagenet_data(train_source, test_source, 221, batch_size, mean_file)
    return _finish(n, "OverFeat_accurate", form, n.fc9, data_layers, top5=True, dyve=dyve)


# Mean BGR pixel of the ILSVRC-2012 training set, as published with the VGG models.
VGG_MEAN_BGR = (103.939, 116.779, 123.68)


def vgg16(form="train_val", dyve=None, train_source=IMAGENET_TRAIN_LMDB,
          test_source=IMAGENET_VAL_LMDB, mean_file=None, mean_value=VGG_MEAN_BGR,
          batch_size=(256, 50), deploy_batch=10):
    """VGG-16: Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale
    Image Recognition", ICLR 2015, Table 1 configuration D.

    13 conv 3x3 (stride 1, pad 1) in blocks of 64,64 | 128,128 | 256x3 | 512x3 | 512x3,
    each block followed by a 2x2/2 max-pool; fc6 4096, fc7 4096, fc8 1000; 224x224 input.
    Layer names are those of the public VGG_ILSVRC_16_layers_deploy.prototxt (conv1_1 ..
    conv5_3, relu*_*, pool1..pool5, fc6, relu6, drop6, fc7, relu7, drop7, fc8, prob), so the
    Model Zoo caffemodel loads by name. Training recipe (Section 3.1): batches of 256,
    dropout 0.5 on fc6/fc7, weights N(0, 0.01), zero biases, random 224 crops with
    horizontal flips, and mean RGB subtraction: by default `mean_value` = the published
    BGR mean pixel; pass `mean_file` to subtract a mean image instead.
    138,357,544 parameters.
    """
    _check_form(form)
    n = caffe.NetSpec()
    top = _input(n, form, (deploy_batch, 3, 224, 224))
    blocks = [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]
    for b, (width, depth) in enumerate(blocks, start=1):
        for i in range(1, depth + 1):
            n[f"conv{b}_{i}"] = _conv(top, width, 3, 0.01, pad=1)
            n[f"relu{b}_{i}"] = top = _relu(n[f"conv{b}_{i}"])
        n[f"pool{b}"] = top = _max_pool(top, 2, 2)
    n.fc6 = _fc(top, 4096, 0.01)
    n.relu6 = _relu(n.fc6)
    n.drop6 = _dropout(n.relu6)
    n.fc7 = _fc(n.drop6, 4096, 0.01)
    n.relu7 = _relu(n.fc7)
    n.drop7 = _dropout(n.relu7)
    n.fc8 = _fc(n.drop7, 1000, 0.01)
    data_layers = _imagenet_data(train_source, test_source, 224, batch_size,
                                 mean_file=mean_file, mean_value=mean_value)
    return _finish(n, "VGG_ILSVRC_16_layers", form, n.fc8, data_layers, top5=True,
                   dyve=dyve)


# dlib's input_rgb_image mean pixel (dlib/dnn/input.h: avg_red 122.782, avg_green 117.001,
# avg_blue 104.298), in Caffe's BGR order.
DLIB_MEAN_BGR = (104.298, 117.001, 122.782)
# ResNet-34: (stage, width, blocks) of He et al. 2016, Table 1, "34-layer".
RESNET34_STAGES = ((2, 64, 3), (3, 128, 4), (4, 256, 6), (5, 512, 3))


def resnet34(form="train_val", dyve=None, train_source=IMAGENET_TRAIN_LMDB,
             test_source=IMAGENET_VAL_LMDB, mean_value=DLIB_MEAN_BGR, batch_size=(256, 50),
             deploy_batch=10):
    """ResNet-34 (He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
    CVPR 2016, Table 1) exactly as dlib's examples/dnn_imagenet_ex.cpp builds it, the net
    of dlib's resnet34_1000_imagenet_classifier.dnn (python/dyve/resnet34.py converts
    its weights; docs/resnet34.md has the layer-by-layer mapping).

    227x227 input (dlib's input_rgb_image_sized<227>); dlib's conv and pooling layers pad
    only at stride 1 (padding kernel/2), never at stride 2:
      conv1 64 7x7/2 pad 0 -> 111, ReLU, pool1 max 3x3/2 -> 55,
      stages res2..res5 of 3, 4, 6, 3 basic blocks (64, 128, 256, 512 maps: 55, 27, 13,
      6): branch2a 3x3 (stride 2, pad 0 in the first block of res3..res5, else stride 1,
      pad 1), ReLU, branch2b 3x3/1 pad 1, Eltwise SUM with the shortcut, ReLU;
      pool5 global average, fc1000.
    dlib's affine layers (batch norm at inference) are folded into the convolutions, so
    every convolution has a bias and the net has no BatchNorm/Scale layer. The shortcut of
    a downsampling block is dlib's avg_pool 2x2/2 (pad 0, floor rounding) of the block's
    input, zero-extended to twice the channels by dlib's add_prev: here
    `res<s>a_branch1_pool` (AVE 2x2/2, round_mode FLOOR), `res<s>a_branch1_zeros` (Power
    scale 0: zeros of the same shape) and `res<s>a_branch1` (Concat of the two). Max and
    average pools use round_mode FLOOR, dlib's output-size rule. Input: BGR pixels minus
    `mean_value` (dlib's mean); dlib's further division by 256 and its RGB order are
    folded into conv1's weights by the converter, so no `scale` in the transform.

    DyVE form: conv1 and every branch2a (a ReLU follows directly) become DyveConvolution;
    branch2b feeds the Eltwise and stays stock, as does fc1000. The train_val form
    (random/centre 227 crops of 256x256 LMDBs, mirror for TRAIN) is for evaluating the
    converted weights with `caffe test`; with the batch norms folded it is not a
    training recipe.
    """
    _check_form(form)
    n = caffe.NetSpec()
    top = _input(n, form, (deploy_batch, 3, 227, 227))
    floor = P.Pooling.FLOOR

    def conv(bottom, num_output, kernel_size, stride=1, pad=0):
        kw = dict(num_output=num_output, kernel_size=kernel_size)
        if pad:
            kw["pad"] = pad
        if stride != 1:
            kw["stride"] = stride
        return L.Convolution(bottom, param=_LR_DECAY, **kw,
                             weight_filler=dict(type="msra"),
                             bias_filler=dict(type="constant", value=0))

    n.conv1 = conv(top, 64, 7, stride=2)
    n.conv1_relu = _relu(n.conv1)
    n.pool1 = top = L.Pooling(n.conv1, pool=P.Pooling.MAX, kernel_size=3, stride=2,
                              round_mode=floor)
    for stage, width, blocks in RESNET34_STAGES:
        for b in range(blocks):
            name = f"res{stage}{chr(ord('a') + b)}"
            down = b == 0 and stage > 2
            n[name + "_branch2a"] = conv(top, width, 3, stride=2 if down else 1,
                                         pad=0 if down else 1)
            n[name + "_branch2a_relu"] = _relu(n[name + "_branch2a"])
            n[name + "_branch2b"] = conv(n[name + "_branch2a"], width, 3, pad=1)
            shortcut = top
            if down:
                n[name + "_branch1_pool"] = L.Pooling(top, pool=P.Pooling.AVE, kernel_size=2,
                                                      stride=2, round_mode=floor)
                n[name + "_branch1_zeros"] = L.Power(n[name + "_branch1_pool"], scale=0)
                n[name + "_branch1"] = shortcut = L.Concat(n[name + "_branch1_pool"],
                                                           n[name + "_branch1_zeros"])
            n[name] = L.Eltwise(n[name + "_branch2b"], shortcut,
                                operation=P.Eltwise.SUM)
            n[name + "_relu"] = top = _relu(n[name])
    n.pool5 = L.Pooling(top, pool=P.Pooling.AVE, global_pooling=True)
    n.fc1000 = L.InnerProduct(n.pool5, param=_LR_DECAY, num_output=1000,
                              weight_filler=dict(type="msra"),
                              bias_filler=dict(type="constant", value=0))
    data_layers = _imagenet_data(train_source, test_source, 227, batch_size,
                                 mean_value=mean_value)
    return _finish(n, "ResNet-34_dlib", form, n.fc1000, data_layers, top5=True, dyve=dyve)


NETS = {
    "cifar10_quick": cifar10_quick,
    "cifar10_full": cifar10_full,
    "alexnet": alexnet,
    "overfeat_fast": overfeat_fast,
    "overfeat_accurate": overfeat_accurate,
    "vgg16": vgg16,
    "resnet34": resnet34,
}


def build(name, form="train_val", dyve=None, **kwargs):
    """The net `name` (a key of NETS) in `form`; see the per-net functions."""
    if name not in NETS:
        raise ValueError(f"unknown net {name!r}; known: {', '.join(NETS)}")
    return NETS[name](form=form, dyve=dyve, **kwargs)


# --------------------------------------------------------------------------- text

def to_text(message):
    """Protobuf text format of a NetParameter or SolverParameter, as written to the
    .prototxt files (shortest round-tripping floats, e.g. 0.0001 rather than 9.99e-05)."""
    return text_format.MessageToString(message)
