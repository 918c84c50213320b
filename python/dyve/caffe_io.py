"""Caffe I/O shared by dyve.tune and dyve.bench: prototxts, caffemodels, nets and images.

Both tools read nets, weights and images through this module, so they refuse the same bad
input with the same message and preprocess images alike: as Caffe's TEST data layer does
(mean subtraction, then a centre crop to the net's input). Errors are InputError, naming
the command-line flag (`what`) and the file.
"""
import contextlib
import os
import tempfile
import warnings

import numpy as np

from dyve import data
from dyve import settings as dyve_settings
from dyve.errors import InputError

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
# Folder images are first resized to this when the net's input is ImageNet-sized (the
# convention of Caffe's ImageNet LMDBs: 256 x 256, then a centre crop).
IMAGENET_STORED_SIZE = 256


def caffe_module():
    """pycaffe, in CPU mode, with Caffe's log quiet unless GLOG_minloglevel says else."""
    os.environ.setdefault("GLOG_minloglevel", "2")  # before pycaffe loads glog
    import caffe
    caffe.set_mode_cpu()
    return caffe


def need_file(path, what, kind="file"):
    """`path` if it is an existing regular file, else an InputError naming `what`."""
    if not path:
        raise InputError(f"{what}: no {kind} given")
    if not os.path.exists(path):
        raise InputError(f"{what}: {kind} {path} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{what}: {kind} {path} is a folder")
    return path


# ----------------------------------------------------------------------------- prototxts

def read_net_param(path, what="--model"):
    """The NetParameter of a text prototxt, checked so that Caffe will not abort on it."""
    from caffe.proto import caffe_pb2
    from google.protobuf import text_format
    need_file(path, what, "prototxt")
    param = caffe_pb2.NetParameter()
    try:
        with open(path) as f:
            text_format.Merge(f.read(), param)
    except (text_format.ParseError, UnicodeDecodeError) as error:
        raise InputError(f"{what}: {path} is not a valid NetParameter prototxt: {error}") \
            from None
    if param.layers:
        raise InputError(f"{what}: {path} uses the V1 'layers' format; upgrade it with "
                         "upgrade_net_proto_text first")
    if not param.layer:
        raise InputError(f"{what}: {path} has no layers")
    known = set(caffe_module().layer_type_list())
    for layer in param.layer:
        if layer.type not in known:
            raise InputError(f"{what}: {path}: layer '{layer.name}' has type "
                             f"'{layer.type}', which this Caffe does not know")
        if layer.HasField("dyve_param") and layer.type not in dyve_settings.DYVE_TYPES:
            raise InputError(f"{what}: {path}: {layer.type} layer '{layer.name}' has a "
                             "dyve_param, which only DyveConvolution and DyveInnerProduct "
                             "layers read; remove it or use the DyVE layer type")
    return param


def has_dyve_layers(param):
    return any(layer.type in dyve_settings.DYVE_TYPES for layer in param.layer)


def dyve_net_param(path, what="--model"):
    """(DyVE NetParameter, converted): a DyVE prototxt as it is, or a stock one converted
    by rewrite.to_dyve with every knob off."""
    from dyve import rewrite
    param = read_net_param(path, what)
    if has_dyve_layers(param):
        return param, False
    try:
        converted = rewrite.to_dyve(param, {})
    except ValueError as error:
        raise InputError(f"{what}: {path}: {error}") from None
    if not has_dyve_layers(converted):
        raise InputError(f"{what}: {path} has no layer DyVE can convert (a Convolution or "
                         "InnerProduct followed by a ReLU)")
    return converted, True


# ----------------------------------------------------------------------------- caffemodels

def _blob_shape(blob):
    """(shape, legacy) of a BlobProto; legacy 4-d blobs use num/channels/height/width."""
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") \
            or blob.HasField("width"):
        return (blob.num, blob.channels, blob.height, blob.width), True
    return tuple(blob.shape.dim), False


def shape_equals(net_shape, stored_shape, legacy):
    """Caffe's Blob::ShapeEquals: a legacy shape compares as 4-d, padded with leading 1s."""
    net_shape = tuple(net_shape)
    if legacy:
        return len(net_shape) <= 4 and (1,) * (4 - len(net_shape)) + net_shape \
            == tuple(stored_shape)
    return net_shape == tuple(stored_shape)


def _fmt_shape(shape):
    return "x".join(str(d) for d in shape)


def weight_blobs(path, what="--weights"):
    """{layer name: [[(shape, legacy, count), ...] per same-name layer]} of a binary
    caffemodel or a Caffe HDF5 snapshot (Caffe copies every same-name layer in turn)."""
    need_file(path, what, "caffemodel")
    with open(path, "rb") as f:
        head = f.read(8)
    if head == HDF5_MAGIC:
        return _hdf5_blobs(path, what)
    from caffe.proto import caffe_pb2
    param = caffe_pb2.NetParameter()
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("error")  # a partial parse only warns
            param.ParseFromString(f.read())
    except Exception as error:  # protobuf DecodeError and friends
        raise InputError(f"{what}: {path} is not a binary caffemodel: {error}") from None
    layers = list(param.layer) + list(param.layers)  # V1 models keep "layers"
    if not layers:
        raise InputError(f"{what}: {path} holds no layers (not a caffemodel?)")
    out = {}
    for layer in layers:
        blobs = []
        for blob in layer.blobs:
            shape, legacy = _blob_shape(blob)
            blobs.append((shape, legacy, len(blob.double_data) or len(blob.data)))
        out.setdefault(layer.name, []).append(blobs)
    return out


def _hdf5_blobs(path, what):
    try:
        import h5py
    except ImportError:
        raise InputError(f"{what}: {path} is an HDF5 file and h5py is missing") from None
    out = {}
    try:
        with h5py.File(path, "r") as h5:
            if "data" not in h5:
                raise InputError(f"{what}: {path} is an HDF5 file without a 'data' group "
                                 "(not a Caffe snapshot)")
            for name, group in h5["data"].items():
                blobs = []
                for i in range(len(group)):
                    if str(i) not in group:
                        raise InputError(f"{what}: {path}: layer '{name}' lacks blob {i}")
                    shape = tuple(group[str(i)].shape)
                    blobs.append((shape, False, int(np.prod(shape, dtype=np.int64))))
                out[name] = [blobs]
    except OSError as error:
        raise InputError(f"{what}: {path} is not a readable HDF5 file: {error}") from None
    return out


def check_weights(net, weights, what="--weights", model=None):
    """Refuse a caffemodel that does not fit `net` (Caffe would abort the process).

    Every caffemodel layer whose name is in the net must have the net's number of blobs,
    their shapes and as many values; every net layer with parameters must have weights
    (Caffe would silently keep zeros).
    """
    source = weight_blobs(weights, what)
    names = set(net._layer_names)
    dyve_names = {name for name, layer in zip(net._layer_names, net.layers)
                  if layer.type in dyve_settings.DYVE_TYPES}
    problems = []
    for name, versions in source.items():
        if name not in names:
            continue  # Caffe ignores caffemodel layers the net does not have
        target = net.params[name] if name in net.params else []
        for blobs in versions:
            if len(target) != len(blobs):
                problems.append(f"layer '{name}': {len(target)} parameter blob(s) in the "
                                f"prototxt, {len(blobs)} in the caffemodel")
                continue
            for i, (shape, legacy, count) in enumerate(blobs):
                want = tuple(target[i].data.shape)
                if not shape_equals(want, shape, legacy):
                    problems.append(f"layer '{name}' blob {i}: prototxt {_fmt_shape(want)}, "
                                    f"caffemodel {_fmt_shape(shape)}")
                elif count != int(np.prod(want, dtype=np.int64)):
                    problems.append(f"layer '{name}' blob {i}: the caffemodel holds {count} "
                                    f"values for shape {_fmt_shape(want)}")
    for name in net.params:
        if not any(source.get(name, [])):
            kind = "DyVE layer" if name in dyve_names else "layer"
            problems.append(f"{kind} '{name}' has no weights in the caffemodel")
    if problems:
        against = f" {model}" if model else " the prototxt"
        raise InputError(f"{what}: {weights} does not match{against}:\n  "
                         + "\n  ".join(problems))


@contextlib.contextmanager
def _prototxt_file(net_param):
    """A path to `net_param` as a text prototxt (pycaffe builds nets from files only).

    The file is unlinked before Caffe reads it, through /proc/self/fd, so nothing is left
    behind even when a CHECK in Caffe aborts the process."""
    from google.protobuf import text_format
    with tempfile.TemporaryFile("w+", suffix=".prototxt", prefix="dyve_net_") as f:
        f.write(text_format.MessageToString(net_param))
        f.flush()
        yield f"/proc/self/fd/{f.fileno()}"


def load_net(model, weights=None, what="--weights", model_name=None):
    """A TEST-phase pycaffe net of `model` (a prototxt path or a NetParameter), with
    `weights` checked against it first and loaded when given."""
    caffe = caffe_module()
    if isinstance(model, (str, os.PathLike)):
        net = caffe.Net(os.fspath(model), caffe.TEST)
        model_name = model_name or os.fspath(model)
    else:
        with _prototxt_file(model) as path:
            net = caffe.Net(path, caffe.TEST)
    if weights:
        check_weights(net, weights, what, model_name)
        net.copy_from(weights)
        check_finite(net, weights, what)
    return net


def check_finite(net, weights, what="--weights"):
    """Refuse loaded weights that hold NaN or infinity, naming the blob."""
    for name, params in net.params.items():
        for i, blob in enumerate(params):
            if not np.all(np.isfinite(blob.data)):
                raise InputError(f"{what}: {weights}: layer '{name}' blob {i} holds values "
                                 "that are not finite (NaN or infinity)")


# ----------------------------------------------------------------------------- nets

def input_blob(net, what="--model"):
    """The name of the net's one image input (N x C x H x W)."""
    if len(net.inputs) != 1 or net.blobs[net.inputs[0]].data.ndim != 4:
        raise InputError(f"{what}: the net needs exactly one image input blob (N x C x H x "
                         f"W); it has {list(net.inputs) or 'none'}")
    return net.inputs[0]


def output_blob(net, what="--model"):
    """The blob both tools score: the net's only output, or 'prob' among several."""
    outputs = list(net.outputs)
    if len(outputs) == 1:
        return outputs[0]
    if "prob" in outputs:
        return "prob"
    raise InputError(f"{what}: the net has outputs {outputs or 'none'}; give it one output "
                     "(or one named 'prob') to score")


INT_MAX = 2 ** 31 - 1  # Caffe counts a blob's elements in an int


def max_batch(input_shape):
    """The largest batch whose input blob Caffe can hold."""
    return max(1, INT_MAX // int(np.prod(input_shape)))


def reshape(net, batch):
    """Reshape the net's input (and every blob after it) to `batch` images."""
    blob = net.blobs[input_blob(net)]
    if blob.data.shape[0] != batch:
        blob.reshape(batch, *blob.data.shape[1:])
        net.reshape()


def forward(net, x):
    """Scores (a copy, N x classes) of the output blob for the batch `x`."""
    reshape(net, len(x))
    net.blobs[input_blob(net)].data[...] = x
    net._forward(0, len(net.layers) - 1)
    return net.blobs[output_blob(net)].data.reshape(len(x), -1).copy()


WEIGHTED_TYPES = tuple(dyve_settings.STOCK_TO_DYVE) + dyve_settings.DYVE_TYPES


def layer_macs(net):
    """{layer: dense MACs per image} of every (Dyve)Convolution / (Dyve)InnerProduct:
    outputs per image x weights per output."""
    macs = {}
    for name, layer in zip(net._layer_names, net.layers):
        if layer.type not in WEIGHTED_TYPES:
            continue
        top = net.blobs[net.top_names[name][0]].data
        outputs = top.size // top.shape[0]
        weights = net.params[name][0].data
        if layer.type in dyve_settings.CONVOLUTION_TYPES:
            fan_in = int(np.prod(weights.shape[1:]))
        else:  # an inner product's weights are N x K, or K x N when transposed
            fan_in = weights.size // outputs
        macs[name] = int(outputs) * fan_in
    return macs


# ----------------------------------------------------------------------------- images

def read_mean(spec, channels, what="--mean"):
    """float32 C x H x W mean image of a mean.binaryproto, or C x 1 x 1 of per-channel
    values (a sequence, or a string 'b,g,r'); None without `spec`. Refuses a mean that is
    not finite or has the wrong number of channels."""
    if spec is None:
        return None
    if isinstance(spec, str) and not _numbers(spec):
        need_file(spec, what, "mean file")
        try:
            mean = data.read_mean(spec)
        except Exception as error:  # protobuf decode errors, a bad shape
            raise InputError(f"{what}: {spec} is not a mean.binaryproto: {error}") from None
        if mean.shape[0] != channels:
            raise InputError(f"{what}: {spec} has {mean.shape[0]} channels, the net wants "
                             f"{channels}")
        source = spec
    else:
        values = _numbers(spec) if isinstance(spec, str) else [float(v) for v in spec]
        if len(values) not in (1, channels):
            raise InputError(f"{what}: {len(values)} mean values for {channels} channels")
        mean = np.array(values, np.float32).reshape(-1, 1, 1)
        source = "the mean values"
    if not np.all(np.isfinite(mean)):
        raise InputError(f"{what}: {source} holds values that are not finite")
    return mean


def _numbers(text):
    """The numbers of a comma-separated string such as '104,117,123', else None."""
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        return None


def image_source(path, what="--images"):
    """The kind of an image set: 'lmdb', 'wnid_files' (every file name starts with its
    ImageNet wnid) or 'class_folders' (<class>/<image>, labels in sorted class order)."""
    if not path or not os.path.exists(path):
        raise InputError(f"{what}: {path!r} does not exist")
    if not os.path.isdir(path):
        raise InputError(f"{what}: {path} is neither an LMDB nor a folder of images")
    if os.path.isfile(os.path.join(path, "data.mdb")):
        return "lmdb"
    names = [name for _, _, files in os.walk(path, followlinks=True) for name in files
             if name.lower().endswith(data.IMAGE_EXTENSIONS)]
    if not names:
        raise InputError(f"{what}: {path} is empty (no LMDB, no *.jpg|png files)")
    if all(data.WNID_PREFIX.match(name) for name in names):
        return "wnid_files"
    if any(os.path.isdir(os.path.join(path, d)) for d in os.listdir(path)):
        return "class_folders"
    raise InputError(f"{what}: {path}: file names do not start with a wnid (nXXXXXXXX_) "
                     "and there are no class folders")


def _labelled_files(path, kind, what):
    """[(file, label)] of a folder image set, sorted, and the class names."""
    if kind == "wnid_files":
        try:
            items = data.imagenet_labels(path)
        except data.DataError as error:
            raise InputError(f"{what}: {error}") from None
        return [(os.path.join(path, rel), label) for rel, label in items], None
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    items = []
    for label, cls in enumerate(classes):
        for name in sorted(os.listdir(os.path.join(path, cls))):
            if name.lower().endswith(data.IMAGE_EXTENSIONS):
                items.append((os.path.join(path, cls, name), label))
    return items, classes


def _stored_size(input_hw, mean):
    """The size folder images are resized to before the crop: the mean image's, else
    ImageNet's 256 x 256 for inputs over 64 pixels, else the input's own."""
    h, w = input_hw
    if mean is not None and mean.shape[1:] != (1, 1):
        return mean.shape[1:]
    if h > 64:
        return max(h, IMAGENET_STORED_SIZE), max(w, IMAGENET_STORED_SIZE)
    return h, w


def _read_folder(items, channels, size, what):
    import cv2
    from tqdm import tqdm
    flag = cv2.IMREAD_GRAYSCALE if channels == 1 else cv2.IMREAD_COLOR
    images = []
    for file, _ in tqdm(items, desc="reading", unit=" img", disable=None, leave=False):
        img = cv2.imread(file, flag)
        if img is None:
            raise InputError(f"{what}: OpenCV cannot read the image {file}")
        if img.shape[:2] != tuple(size):
            img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        images.append(img[None] if img.ndim == 2 else img.transpose(2, 0, 1))
    return np.stack(images)


def load_images(path, input_shape, mean=None, limit=None, seed=1701, what="--images"):
    """(float32 N x C x H x W, int64 labels) of an image set, preprocessed as Caffe's TEST
    data layer does for a net whose input is `input_shape` (C, H, W).

    `path`: a Datum LMDB (its first `limit` records in key order), a folder of
    wnid-prefixed files or of <class>/ folders (a seeded random subset of `limit` files).
    Folder images are resized to the mean image's size (else see _stored_size). `mean`: a
    mean.binaryproto, or per-channel values, or None; a mean image must have the stored
    images' size (subtracted before the centre crop) or the input's (after it). Refuses
    images smaller than the input: they are never upscaled.
    """
    c, h, w = input_shape
    mean_arr = read_mean(mean, c)
    kind = image_source(path, what)
    if kind == "lmdb":
        try:
            images, labels = data.read_lmdb(path, limit=limit)
        except data.DataError as error:
            raise InputError(f"{what}: {error}") from None
    else:
        items, _ = _labelled_files(path, kind, what)
        if limit is not None and limit < len(items):
            keep = np.sort(np.random.RandomState(seed).permutation(len(items))[:limit])
            items = [items[i] for i in keep]
        images = _read_folder(items, c, _stored_size((h, w), mean_arr), what)
        labels = np.asarray([label for _, label in items], np.int64)
    if not len(images):
        raise InputError(f"{what}: {path} is empty (no images)")
    _, ci, hi, wi = images.shape
    if ci != c:
        raise InputError(f"{what}: images in {path} have {ci} channels, the net wants {c}")
    if hi < h or wi < w:
        raise InputError(f"{what}: images in {path} are {hi}x{wi}, smaller than the net's "
                         f"input {h}x{w}")
    x = images.astype(np.float32)
    y0, x0 = (hi - h) // 2, (wi - w) // 2
    image_mean = mean_arr is not None and mean_arr.shape[1:] != (1, 1)
    if image_mean and mean_arr.shape[1:] not in ((hi, wi), (h, w)):
        raise InputError(f"{what}: the mean {mean} is {mean_arr.shape[1]}x"
                         f"{mean_arr.shape[2]}, neither the images' {hi}x{wi} nor the "
                         f"input's {h}x{w}")
    if image_mean and mean_arr.shape[1:] == (hi, wi):
        x -= mean_arr
    x = np.ascontiguousarray(x[:, :, y0:y0 + h, x0:x0 + w])
    if image_mean and mean_arr.shape[1:] == (h, w) and (hi, wi) != (h, w):
        x -= mean_arr
    if mean_arr is not None and not image_mean:
        x -= mean_arr
    return x, np.asarray(labels, np.int64)


def check_labels(labels, classes, path, what="--images"):
    """Refuse labels that the net's `classes` outputs cannot predict."""
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise InputError(f"{what}: labels in {path} go from {labels.min()} to "
                         f"{labels.max()}, but the net has {classes} outputs (wrong images "
                         "for this net?)")
