"""The ONNX side of dyve: runs in build/onnx-venv (onnx, onnxruntime, numpy 2; `make
onnx-venv`), never with pycaffe, whose protobuf is too old for onnx. dyve.export_onnx
starts it as a worker process:

* ``python -m dyve.onnx_worker build GRAPH_JSON ARRAYS_NPZ OUT_ONNX``: builds the model
  from the node list and arrays that dyve.export_onnx made of a Caffe net, checks it
  (onnx.checker with full_check, strict shape inference whose shapes must equal Caffe's
  blob shapes), writes it atomically and prints a one-line JSON report;
* ``python -m dyve.onnx_worker serve MODEL --threads T [--spinning]``: one ONNX Runtime
  session (CPU, intra_op_num_threads T, inter_op_num_threads 1, sequential execution)
  serving requests on stdin/stdout (dyve.export_onnx.OrtRunner): each message is a
  little-endian header of two uint32 (JSON length, payload length), the JSON, then the
  payload (a float32 batch in, the requested outputs back); the reply to "run" carries
  the seconds of ``session.run`` alone, measured here.
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

from dyve import files

IR_VERSION = 8  # the IR of opset 17 (onnx.helper.VERSION_TABLE)


def _attribute(value):
    """A node attribute from JSON: {"tensor_float": [...]} is a float tensor (the value
    of ConstantOfShape), anything else as it is."""
    if isinstance(value, dict) and set(value) == {"tensor_float"}:
        from onnx import numpy_helper
        return numpy_helper.from_array(np.asarray(value["tensor_float"], np.float32))
    return value


SKELETON_MAX_ELEMENTS = 4096


def _skeleton(model):
    """A copy of `model` whose initializers above SKELETON_MAX_ELEMENTS elements are
    graph inputs of the same type and shape instead."""
    from onnx import helper
    graph = model.graph
    small = [t for t in graph.initializer if _elements(t) <= SKELETON_MAX_ELEMENTS]
    big = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
           for t in graph.initializer if _elements(t) > SKELETON_MAX_ELEMENTS]
    g = helper.make_graph(list(graph.node), graph.name, list(graph.input) + big,
                          list(graph.output), small)
    skeleton = helper.make_model(g, opset_imports=list(model.opset_import))
    skeleton.ir_version = model.ir_version
    return skeleton


def _elements(tensor):
    n = 1
    for d in tensor.dims:
        n *= d
    return n


def build(graph_json, arrays_npz, out):
    import onnx
    from onnx import helper, numpy_helper
    with open(graph_json) as f:
        spec = json.load(f)
    arrays = np.load(arrays_npz, allow_pickle=False)
    initializers = [numpy_helper.from_array(arrays[name], name) for name in arrays.files]
    nodes = [helper.make_node(n["op"], n["inputs"], n["outputs"], name=n["name"],
                              **{k: _attribute(v) for k, v in n["attrs"].items()})
             for n in spec["nodes"]]
    value = lambda v: helper.make_tensor_value_info(v["name"], onnx.TensorProto.FLOAT,
                                                    v["shape"])
    graph = helper.make_graph(nodes, spec["name"], [value(v) for v in spec["inputs"]],
                              [value(v) for v in spec["outputs"]], initializers)
    model = helper.make_model(graph, producer_name="dyve.export_onnx",
                              opset_imports=[helper.make_opsetid("", spec["opset"])])
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {str(k): str(v) for k, v in spec["metadata"].items()})
    # The checks run on a skeleton: the large initializers (the weights) become graph
    # inputs of their shape, so the checker and shape inference, which serialize the
    # model, copy kilobytes instead of VGG-16's 550 MB (35 s -> 15 s for its export);
    # the small ones (Reshape, Slice, Pad operands, which shapes depend on) stay values.
    onnx.checker.check_model(_skeleton(model), full_check=True)
    # data_prop: a constant-filled Power (scale 0) is ConstantOfShape(Shape(x)); only data
    # propagation carries x's dimensions through Shape, so that a Concat of it is known.
    inferred = onnx.shape_inference.infer_shapes(_skeleton(model), check_type=True,
                                                 strict_mode=True, data_prop=True)
    got = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        got[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    problems = []
    for name, shape in spec["shapes"].items():
        if name not in got:
            problems.append(f"{name}: no shape inferred")
        elif list(got[name][1:]) != list(shape):
            problems.append(f"{name}: ONNX shape {got[name][1:]}, Caffe {shape}")
    if problems:
        raise ValueError("ONNX shapes differ from Caffe's (per image): "
                         + "; ".join(problems[:5]))
    with files.atomic_path(out) as tmp:
        onnx.save(model, tmp)
    print(json.dumps({"nodes": len(nodes), "initializers": len(initializers),
                      "opset": spec["opset"], "onnx": onnx.__version__,
                      "bytes": os.path.getsize(out)}))
    return 0


def session(model, threads, spinning):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning",
                                     "1" if spinning else "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _read_exact(stream, n):
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = stream.readinto(view[got:])
        if not k:
            raise EOFError
        got += k
    return buf


def serve(model, threads, spinning):
    """Answer run requests on stdin until "quit" or end of input (see the module doc)."""
    # The protocol owns file descriptor 1; anything else printing goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer

    def send(header, payload=b""):
        data = json.dumps(header).encode()
        out.write(struct.pack("<II", len(data), len(payload)) + data)
        out.write(payload)
        out.flush()

    import onnxruntime as ort
    try:
        sess = session(model, threads, spinning)
    except Exception as error:  # ORT raises its own exception types
        send({"error": f"cannot load {model}: {error}"})
        return 2
    input_name = sess.get_inputs()[0].name
    names = [o.name for o in sess.get_outputs()]
    send({"onnxruntime": ort.__version__, "numpy": np.__version__, "threads": threads,
          "spinning": spinning, "input": input_name, "outputs": names,
          "providers": sess.get_providers()})
    clock = time.perf_counter
    while True:
        try:
            n, m = struct.unpack("<II", _read_exact(inp, 8))
            header = json.loads(bytes(_read_exact(inp, n)))
            payload = _read_exact(inp, m) if m else bytearray()
        except EOFError:
            return 0
        if header.get("cmd") == "quit":
            return 0
        try:
            x = np.frombuffer(payload, np.float32).reshape(header["shape"])
            want = header.get("want")
            fetch = names if want is None or not want else want
            t0 = clock()
            result = sess.run(fetch, {input_name: x})
            seconds = clock() - t0
        except Exception as error:
            send({"error": str(error).strip().splitlines()[-1]})
            continue
        if want is not None and not want:  # timing only: no outputs back
            send({"seconds": seconds})
            continue
        arrays = [np.ascontiguousarray(r, np.float32) for r in result]
        send({"seconds": seconds,
              "outputs": [{"name": k, "shape": list(a.shape)} for k, a in zip(fetch, arrays)]},
             b"".join(a.tobytes() for a in arrays))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m dyve.onnx_worker", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("graph")
    b.add_argument("arrays")
    b.add_argument("out")
    s = sub.add_parser("serve")
    s.add_argument("model")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--spinning", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.cmd == "build":
            return build(args.graph, args.arrays, args.out)
        return serve(args.model, args.threads, args.spinning)
    except Exception as error:  # one line for dyve.export_onnx to show
        message = " ".join(str(error).split())
        print(f"error: {type(error).__name__}: {message[:2000]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
