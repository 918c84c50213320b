#include "caffe/util/dyve_dnnl.hpp"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <unordered_map>

#ifdef DYVE_USE_DNNL
#include <omp.h>

#include "oneapi/dnnl/dnnl.hpp"
#endif

namespace caffe {

DyveConvShape::DyveConvShape()
    : num(0), channels(0), height(0), width(0), num_output(0), group(1),
      kernel_h(1), kernel_w(1), stride_h(1), stride_w(1), pad_h(0), pad_w(0),
      dilation_h(1), dilation_w(1), band_begin(0), band_end(0), bias(false),
      relu(false) {}

int DyveConvShape::output_height() const {
  return (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) / stride_h +
      1;
}

bool DyveConvShape::operator==(const DyveConvShape& o) const {
  return num == o.num && channels == o.channels && height == o.height &&
      width == o.width && num_output == o.num_output && group == o.group &&
      kernel_h == o.kernel_h && kernel_w == o.kernel_w &&
      stride_h == o.stride_h && stride_w == o.stride_w && pad_h == o.pad_h &&
      pad_w == o.pad_w && dilation_h == o.dilation_h &&
      dilation_w == o.dilation_w && band_begin == o.band_begin &&
      band_end == o.band_end && bias == o.bias && relu == o.relu;
}

bool DyveDnnlConvolution::Available() {
#ifdef DYVE_USE_DNNL
  static const bool available = []() {
    const char* dense = std::getenv("DYVE_DENSE");
    return dense == NULL || std::string(dense) != "caffe";
  }();
  return available;
#else
  return false;
#endif
}

#ifdef DYVE_USE_DNNL

namespace {

// Sets the calling thread's OpenMP thread count for its lifetime, then puts
// the old one back: oneDNN fixes a kernel's thread count when it creates it
// (from omp_get_max_threads, which is the core count unless OMP_NUM_THREADS
// says otherwise) and runs that many at every execution.
class OmpThreads {
 public:
  explicit OmpThreads(int threads) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(threads);
  }
  ~OmpThreads() { omp_set_num_threads(saved_); }

 private:
  const int saved_;
};

}  // namespace

struct DyveDnnlConvolution::State {
  State() : configured(false), usable(false), weighted(false),
      src_reorder(false), dst_reorder(false), src_offset(0), dst_offset(0) {}
  DyveConvShape shape;
  bool configured, usable, weighted, src_reorder, dst_reorder;
  dnnl::engine engine;
  dnnl::stream stream;
  dnnl::convolution_forward::primitive_desc pd;
  dnnl::convolution_forward conv;
  dnnl::reorder to_kernel, to_caffe;
  // The caller's blobs (handles set per call), the re-laid ones, the weights
  // in the kernel's format, the bias and this object's scratchpads: oneDNN's
  // own one is shared by all primitives, which then could not run
  // concurrently (one kernel per thread of the layer).
  dnnl::memory user_src, user_dst, src, dst, weights, bias;
  dnnl::memory scratch, to_kernel_scratch, to_caffe_scratch;
  std::string implementation;
  // Where a band's input and output rows start in the whole blobs.
  size_t src_offset, dst_offset;
};

DyveDnnlConvolution::DyveDnnlConvolution() : state_(new State) {}

DyveDnnlConvolution::~DyveDnnlConvolution() { delete state_; }

bool DyveDnnlConvolution::Configure(const DyveConvShape& shape) {
  State& s = *state_;
  if (s.configured && s.shape == shape) return s.usable;
  s.configured = true;
  s.shape = shape;
  s.usable = false;
  s.weighted = false;
  s.implementation.clear();
  if (!Available()) return false;
  using dnnl::memory;
  typedef memory::format_tag tag;
  const memory::data_type f32 = memory::data_type::f32;
  const int out_h = shape.output_height();
  const int out_w = (shape.width + 2 * shape.pad_w -
      (shape.dilation_w * (shape.kernel_w - 1) + 1)) / shape.stride_w + 1;
  // A band of output rows reads input rows [in_begin, in_end) of the blob, a
  // strided view of it, with the padding its rows see at the top and bottom.
  const int row_begin = shape.band_end > 0 ? shape.band_begin : 0;
  const int row_end = shape.band_end > 0 ? shape.band_end : out_h;
  CHECK(0 <= row_begin && row_begin < row_end && row_end <= out_h)
      << "DyveDnnlConvolution: band [" << row_begin << ", " << row_end
      << ") of " << out_h << " output rows";
  const int first = row_begin * shape.stride_h - shape.pad_h;
  const int span = (row_end - row_begin - 1) * shape.stride_h +
      shape.dilation_h * (shape.kernel_h - 1) + 1;
  const int in_begin = std::max(0, first);
  const int in_end = std::min(shape.height, first + span);
  if (in_end <= in_begin) return false;  // a band in the padding alone
  const int pad_top = in_begin - first, pad_bottom = first + span - in_end;
  s.src_offset = static_cast<size_t>(in_begin) * shape.width;
  s.dst_offset = static_cast<size_t>(row_begin) * out_w;
  const memory::dims src_dims = {shape.num, shape.channels,
      in_end - in_begin, shape.width};
  const memory::dims dst_dims = {shape.num, shape.num_output,
      row_end - row_begin, out_w};
  const memory::dims src_strides = {
      static_cast<memory::dim>(shape.channels) * shape.height * shape.width,
      static_cast<memory::dim>(shape.height) * shape.width, shape.width, 1};
  const memory::dims dst_strides = {
      static_cast<memory::dim>(shape.num_output) * out_h * out_w,
      static_cast<memory::dim>(out_h) * out_w, out_w, 1};
  const int g = shape.group;
  const memory::dims w_dims = g == 1 ?
      memory::dims({shape.num_output, shape.channels, shape.kernel_h,
          shape.kernel_w}) :
      memory::dims({g, shape.num_output / g, shape.channels / g,
          shape.kernel_h, shape.kernel_w});
  const memory::dims b_dims = {shape.num_output};
  const OmpThreads one_thread(1);  // see Forward
  try {
    if (!s.engine) {
      s.engine = dnnl::engine(dnnl::engine::kind::cpu, 0);
      s.stream = dnnl::stream(s.engine);
    }
    const memory::desc bias_desc = shape.bias ?
        memory::desc(b_dims, f32, tag::x) : memory::desc();
    dnnl::convolution_forward::desc desc(dnnl::prop_kind::forward_inference,
        dnnl::algorithm::convolution_direct,
        memory::desc(src_dims, f32, tag::any),
        memory::desc(w_dims, f32, tag::any), bias_desc,
        memory::desc(dst_dims, f32, tag::any),
        {shape.stride_h, shape.stride_w},
        {shape.dilation_h - 1, shape.dilation_w - 1},  // oneDNN counts gaps
        {pad_top, shape.pad_w}, {pad_bottom, shape.pad_w});
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (shape.relu) {
      dnnl::post_ops ops;
      ops.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
      attr.set_post_ops(ops);
    }
    s.pd = dnnl::convolution_forward::primitive_desc(desc, attr, s.engine);
    s.conv = dnnl::convolution_forward(s.pd);
    s.user_src = memory({src_dims, f32, src_strides}, s.engine, NULL);
    s.user_dst = memory({dst_dims, f32, dst_strides}, s.engine, NULL);
    s.src_reorder = s.pd.src_desc() != s.user_src.get_desc();
    s.dst_reorder = s.pd.dst_desc() != s.user_dst.get_desc();
    s.src = s.src_reorder ? memory(s.pd.src_desc(), s.engine) : s.user_src;
    s.dst = s.dst_reorder ? memory(s.pd.dst_desc(), s.engine) : s.user_dst;
    s.scratch = memory(s.pd.scratchpad_desc(), s.engine);
    dnnl::primitive_attr reorder_attr;
    reorder_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (s.src_reorder) {
      dnnl::reorder::primitive_desc rpd(s.engine, s.user_src.get_desc(),
          s.engine, s.src.get_desc(), reorder_attr);
      s.to_kernel = dnnl::reorder(rpd);
      s.to_kernel_scratch = memory(rpd.scratchpad_desc(), s.engine);
    }
    if (s.dst_reorder) {
      dnnl::reorder::primitive_desc rpd(s.engine, s.dst.get_desc(),
          s.engine, s.user_dst.get_desc(), reorder_attr);
      s.to_caffe = dnnl::reorder(rpd);
      s.to_caffe_scratch = memory(rpd.scratchpad_desc(), s.engine);
    }
    s.weights = memory(s.pd.weights_desc(), s.engine);
    s.bias = shape.bias ? memory(bias_desc, s.engine) : memory();
    s.implementation = s.pd.impl_info_str();
  } catch (const dnnl::error& error) {
    // No kernel for these shapes (or no memory for it): the caller's path.
    LOG(INFO) << "DyVE: oneDNN has no convolution for this layer's shapes ("
              << error.what() << "); Caffe's im2col + BLAS path is used";
    return false;
  }
  s.usable = true;
  return true;
}

void DyveDnnlConvolution::SetWeights(const float* weights, const float* bias) {
  State& s = *state_;
  CHECK(s.usable) << "DyveDnnlConvolution::SetWeights before Configure";
  const dnnl::memory::desc caffe_desc = s.shape.group == 1 ?
      dnnl::memory::desc(s.pd.weights_desc().dims(),
          dnnl::memory::data_type::f32, dnnl::memory::format_tag::oihw) :
      dnnl::memory::desc(s.pd.weights_desc().dims(),
          dnnl::memory::data_type::f32, dnnl::memory::format_tag::goihw);
  dnnl::memory user(caffe_desc, s.engine, const_cast<float*>(weights));
  dnnl::reorder(user, s.weights).execute(s.stream, user, s.weights);
  if (s.shape.bias) {
    float* b = static_cast<float*>(s.bias.get_data_handle());
    std::copy(bias, bias + s.shape.num_output, b);
  }
  s.stream.wait();
  s.weighted = true;
}

bool DyveDnnlConvolution::has_weights() const { return state_->weighted; }

void DyveDnnlConvolution::Forward(const float* bottom, float* top,
    int threads) {
  State& s = *state_;
  CHECK(s.usable && s.weighted)
      << "DyveDnnlConvolution::Forward before Configure and SetWeights";
  const OmpThreads team(threads);
  s.user_src.set_data_handle(const_cast<float*>(bottom) + s.src_offset);
  s.user_dst.set_data_handle(top + s.dst_offset);
  if (s.src_reorder) {
    s.to_kernel.execute(s.stream, {{DNNL_ARG_FROM, s.user_src},
        {DNNL_ARG_TO, s.src}, {DNNL_ARG_SCRATCHPAD, s.to_kernel_scratch}});
  }
  std::unordered_map<int, dnnl::memory> args = {{DNNL_ARG_SRC, s.src},
      {DNNL_ARG_WEIGHTS, s.weights}, {DNNL_ARG_DST, s.dst},
      {DNNL_ARG_SCRATCHPAD, s.scratch}};
  if (s.shape.bias) args[DNNL_ARG_BIAS] = s.bias;
  s.conv.execute(s.stream, args);
  if (s.dst_reorder) {
    s.to_caffe.execute(s.stream, {{DNNL_ARG_FROM, s.dst},
        {DNNL_ARG_TO, s.user_dst}, {DNNL_ARG_SCRATCHPAD, s.to_caffe_scratch}});
  }
  s.stream.wait();
}

std::string DyveDnnlConvolution::implementation() const {
  return state_->implementation;
}

#else  // !DYVE_USE_DNNL: Configure always fails, the caller keeps its path.

struct DyveDnnlConvolution::State {};

DyveDnnlConvolution::DyveDnnlConvolution() : state_(new State) {}

DyveDnnlConvolution::~DyveDnnlConvolution() { delete state_; }

bool DyveDnnlConvolution::Configure(const DyveConvShape& shape) {
  return false;
}

void DyveDnnlConvolution::SetWeights(const float* weights, const float* bias) {
  LOG(FATAL) << "DyveDnnlConvolution: this build has no oneDNN";
}

bool DyveDnnlConvolution::has_weights() const { return false; }

void DyveDnnlConvolution::Forward(const float* bottom, float* top,
    int threads) {
  LOG(FATAL) << "DyveDnnlConvolution: this build has no oneDNN";
}

std::string DyveDnnlConvolution::implementation() const { return ""; }

#endif  // DYVE_USE_DNNL

}  // namespace caffe
