// DyVE-Caffe: pycaffe functions for DyVE layers, registered into caffe._caffe
// by ExportDyve() (called from _caffe.cpp's module init, see the project's
// patch 0004). The Python-facing API is python/dyve/live.py.
#include <Python.h>  // NOLINT(build/include_alpha)

#include <boost/python.hpp>

#include <string>
#include <utility>
#include <vector>

#include "caffe/layer.hpp"
#include "caffe/layers/dyve_conv_layer.hpp"
#include "caffe/layers/dyve_layer.hpp"

namespace bp = boost::python;

namespace caffe {

namespace {

DyveLayer* AsDyve(Layer<float>* layer) {
  DyveLayer* dyve = dynamic_cast<DyveLayer*>(layer);
  if (dyve == NULL) {
    PyErr_SetString(PyExc_TypeError, (std::string("layer '") +
        layer->layer_param().name() + "' of type " + layer->type() +
        " is not a DyVE layer").c_str());
    bp::throw_error_already_set();
  }
  return dyve;
}

bp::dict DyveEffortDict(Layer<float>* layer) {
  bp::dict result;
  const std::vector<std::pair<std::string, uint64_t> > items =
      AsDyve(layer)->effort().Items();
  for (int i = 0; i < items.size(); ++i) {
    result[items[i].first] = static_cast<unsigned long long>(  // NOLINT
        items[i].second);
  }
  return result;
}

void DyveResetEffort(Layer<float>* layer) { AsDyve(layer)->ResetEffort(); }

// Settings travel as a serialized DyveParameter (bytes), built in Python with
// caffe_pb2, so the two sides share one schema.
bp::object DyveGetParam(Layer<float>* layer) {
  const std::string bytes = AsDyve(layer)->dyve_param().SerializeAsString();
  return bp::object(bp::handle<>(
      PyBytes_FromStringAndSize(bytes.data(), bytes.size())));
}

void DyveSetParam(Layer<float>* layer, bp::object serialized) {
  DyveLayer* dyve = AsDyve(layer);
  char* data = NULL;
  Py_ssize_t size = 0;
  if (PyBytes_AsStringAndSize(serialized.ptr(), &data, &size) != 0) {
    bp::throw_error_already_set();
  }
  DyveParameter param;
  if (!param.ParseFromArray(data, size)) {
    PyErr_SetString(PyExc_ValueError, "not a serialized DyveParameter");
    bp::throw_error_already_set();
  }
  const std::string error = dyve->SetDyveParam(param);
  if (!error.empty()) {
    PyErr_SetString(PyExc_ValueError, error.c_str());
    bp::throw_error_already_set();
  }
}

// Which kernels a DyveConvolution ran last: {"dense": knobs-off path,
// "prefix": SPET's prefix path}; {} for other DyVE layers.
bp::dict DyveKernelPaths(Layer<float>* layer) {
  AsDyve(layer);
  bp::dict result;
  const DyveConvolutionLayer<float>* conv =
      dynamic_cast<const DyveConvolutionLayer<float>*>(layer);
  if (conv != NULL) {
    result["dense"] = conv->dense_path();
    result["prefix"] = conv->prefix_path();
  }
  return result;
}

}  // namespace

void ExportDyve() {
  bp::def("_dyve_effort", &DyveEffortDict);
  bp::def("_dyve_reset_effort", &DyveResetEffort);
  bp::def("_dyve_get_param", &DyveGetParam);
  bp::def("_dyve_set_param", &DyveSetParam);
  bp::def("_dyve_kernel_paths", &DyveKernelPaths);
}

}  // namespace caffe
