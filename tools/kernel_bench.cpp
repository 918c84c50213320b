// Per-layer convolution kernels side by side (docs/kernels.md): Caffe's
// im2col + SGEMM (the stock layer's algorithm, OpenBLAS), oneDNN with the
// NCHW re-layouts the DyVE layer pays, oneDNN in its own blocked layout, its
// plain-layout and Winograd variants, and libxsmm's convolution where it
// builds one. Every candidate computes conv + bias + ReLU on the same data;
// rounds are interleaved (every candidate once per round) and the medians
// are printed as one JSON object. Built by `make kernel-bench`, driven by
// scripts/kernel_bench.py.
//
//   kernel_bench --batch N --threads T --rounds R --min-ms M
//       --layer name,C,H,W,K,kernel,pad,stride [--layer ...]
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <chrono>  // NOLINT(build/c++11)
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#ifdef KERNEL_BENCH_LIBXSMM
#include <libxsmm.h>
#endif

extern "C" void openblas_set_num_threads(int threads);
extern "C" char* openblas_get_config(void);

namespace {

struct Layer {
  std::string name;
  int c, h, w, k, kernel, pad, stride;
  int oh() const { return (h + 2 * pad - kernel) / stride + 1; }
  int ow() const { return (w + 2 * pad - kernel) / stride + 1; }
  double Flops(int n) const {  // 2 per MAC
    return 2.0 * n * k * oh() * ow() * c * kernel * kernel;
  }
};

double Now() {
  return std::chrono::duration<double>(
      std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Caffe's im2col_cpu (src/caffe/util/im2col.cpp), dilation 1.
void Im2col(const float* im, const Layer& l, float* col) {
  const int oh = l.oh(), ow = l.ow();
  for (int c = 0; c < l.c; ++c) {
    for (int kh = 0; kh < l.kernel; ++kh) {
      for (int kw = 0; kw < l.kernel; ++kw) {
        int y = -l.pad + kh;
        for (int oy = 0; oy < oh; ++oy, y += l.stride) {
          if (static_cast<unsigned>(y) >= static_cast<unsigned>(l.h)) {
            for (int ox = 0; ox < ow; ++ox) *(col++) = 0;
            continue;
          }
          int x = -l.pad + kw;
          for (int ox = 0; ox < ow; ++ox, x += l.stride) {
            *(col++) = static_cast<unsigned>(x) < static_cast<unsigned>(l.w) ?
                im[(c * l.h + y) * l.w + x] : 0;
          }
        }
      }
    }
  }
}

// One candidate: a forward over the batch (NCHW in, NCHW out).
struct Candidate {
  std::string name;
  std::function<void()> run, check;  // check: run, output in NCHW
  std::string note;
  bool ok;
};

struct Data {
  std::vector<float> src, weights, bias, dst;
};

Candidate CaffeCandidate(const Layer& l, int n, Data* d) {
  const int taps = l.c * l.kernel * l.kernel, positions = l.oh() * l.ow();
  std::vector<float>* col = new std::vector<float>(taps * positions);
  std::vector<float>* ones = new std::vector<float>(positions, 1.f);
  Candidate c;
  c.name = "caffe_im2col_openblas";
  c.ok = true;
  c.note = "Caffe's im2col_cpu, cblas_sgemm, bias GEMM, ReLU pass";
  c.run = [=]() {
    for (int i = 0; i < n; ++i) {
      const float* in = d->src.data() + i * l.c * l.h * l.w;
      float* out = d->dst.data() + i * l.k * positions;
      Im2col(in, l, col->data());
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, l.k, positions,
          taps, 1.f, d->weights.data(), taps, col->data(), positions, 0.f,
          out, positions);
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, l.k, positions,
          1, 1.f, d->bias.data(), 1, ones->data(), positions, 1.f, out,
          positions);
      for (int j = 0; j < l.k * positions; ++j) out[j] = std::max(out[j], 0.f);
    }
  };
  return c;
}

// oneDNN. mode "nchw": NCHW user memory, re-layouts to and from the format
// oneDNN picks inside the timing (what the DyVE layer pays); "blocked": the
// kernel alone, data already in its format; "plain": source and destination
// forced to NCHW; "winograd": the Winograd algorithm (NCHW re-layouts).
Candidate DnnlCandidate(const Layer& l, int n, Data* d,
    const std::string& mode, dnnl::engine* engine, dnnl::stream* stream) {
  using dnnl::memory;
  Candidate c;
  c.name = "onednn_" + mode;
  c.ok = false;
  const memory::dims src_dims = {n, l.c, l.h, l.w};
  const memory::dims w_dims = {l.k, l.c, l.kernel, l.kernel};
  const memory::dims b_dims = {l.k};
  const memory::dims dst_dims = {n, l.k, l.oh(), l.ow()};
  const memory::dims strides = {l.stride, l.stride};
  const memory::dims padding = {l.pad, l.pad};
  const memory::format_tag any = memory::format_tag::any;
  const memory::format_tag act = mode == "plain" ?
      memory::format_tag::nchw : any;
  const memory::data_type f32 = memory::data_type::f32;
  try {
    dnnl::convolution_forward::desc desc(dnnl::prop_kind::forward_inference,
        mode == "winograd" ? dnnl::algorithm::convolution_winograd :
        dnnl::algorithm::convolution_direct,
        memory::desc(src_dims, f32, act), memory::desc(w_dims, f32, any),
        memory::desc(b_dims, f32, memory::format_tag::x),
        memory::desc(dst_dims, f32, act), strides, padding, padding);
    dnnl::post_ops ops;
    ops.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::primitive_attr attr;
    attr.set_post_ops(ops);
    dnnl::convolution_forward::primitive_desc pd(desc, attr, *engine);
    c.note = std::string("impl ") + pd.impl_info_str();
    memory user_src({src_dims, f32, memory::format_tag::nchw}, *engine,
        d->src.data());
    memory user_w({w_dims, f32, memory::format_tag::oihw}, *engine,
        d->weights.data());
    memory user_b({b_dims, f32, memory::format_tag::x}, *engine,
        d->bias.data());
    memory user_dst({dst_dims, f32, memory::format_tag::nchw}, *engine,
        d->dst.data());
    memory w = user_w;
    if (pd.weights_desc() != user_w.get_desc()) {  // once, as per weights
      w = memory(pd.weights_desc(), *engine);
      dnnl::reorder(user_w, w).execute(*stream, user_w, w);
    }
    const bool src_reorder = pd.src_desc() != user_src.get_desc();
    const bool dst_reorder = pd.dst_desc() != user_dst.get_desc();
    memory src = src_reorder ? memory(pd.src_desc(), *engine) : user_src;
    memory dst = dst_reorder ? memory(pd.dst_desc(), *engine) : user_dst;
    if (src_reorder) {  // the blocked mode times data already in its format
      dnnl::reorder(user_src, src).execute(*stream, user_src, src);
    }
    const bool relayout = mode != "blocked";
    dnnl::convolution_forward conv(pd);
    dnnl::reorder to_blocked, to_nchw;
    if (src_reorder) to_blocked = dnnl::reorder(user_src, src);
    if (dst_reorder) to_nchw = dnnl::reorder(dst, user_dst);
    c.note += std::string(", src ") + (src_reorder ? "blocked" : "nchw") +
        ", dst " + (dst_reorder ? "blocked" : "nchw") +
        (relayout ? ", re-layouts timed" : ", re-layouts not timed");
    dnnl::stream s = *stream;
    c.run = [=]() mutable {
      if (relayout && src_reorder) to_blocked.execute(s, user_src, src);
      conv.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w},
          {DNNL_ARG_BIAS, user_b}, {DNNL_ARG_DST, dst}});
      if (relayout && dst_reorder) to_nchw.execute(s, dst, user_dst);
      s.wait();
    };
    c.check = [=]() mutable {
      conv.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, w},
          {DNNL_ARG_BIAS, user_b}, {DNNL_ARG_DST, dst}});
      if (dst_reorder) to_nchw.execute(s, dst, user_dst);
      s.wait();
    };
    c.ok = true;
  } catch (const dnnl::error& e) {
    c.note = std::string("unsupported: ") + e.what();
  }
  return c;
}

#ifdef KERNEL_BENCH_LIBXSMM
// libxsmm's convolution (libxsmm_dnn, LIBXSMM_DNN_TENSOR_FORMAT_NCHW user
// layout, its own blocked layout inside, copies in and out timed).
Candidate XsmmCandidate(const Layer& l, int n, int threads, Data* d) {
  Candidate c;
  c.name = "libxsmm";
  c.ok = false;
  libxsmm_dnn_conv_desc desc = libxsmm_dnn_conv_desc();
  desc.N = n; desc.C = l.c; desc.H = l.h; desc.W = l.w; desc.K = l.k;
  desc.R = l.kernel; desc.S = l.kernel; desc.u = l.stride; desc.v = l.stride;
  desc.pad_h = l.pad; desc.pad_w = l.pad;
  desc.pad_h_in = 0; desc.pad_w_in = 0; desc.pad_h_out = 0; desc.pad_w_out = 0;
  desc.threads = threads;
  desc.algo = LIBXSMM_DNN_CONV_ALGO_DIRECT;
  desc.buffer_format = LIBXSMM_DNN_TENSOR_FORMAT_LIBXSMM;
  desc.filter_format = LIBXSMM_DNN_TENSOR_FORMAT_LIBXSMM;
  desc.fuse_ops = LIBXSMM_DNN_CONV_FUSE_NONE;
  desc.datatype_in = LIBXSMM_DNN_DATATYPE_F32;
  desc.datatype_out = LIBXSMM_DNN_DATATYPE_F32;
  libxsmm_dnn_err_t status;
  libxsmm_dnn_layer* handle = libxsmm_dnn_create_conv_layer(desc, &status);
  if (status != LIBXSMM_DNN_SUCCESS &&
      status != LIBXSMM_DNN_WARN_FALLBACK) {
    c.note = std::string("unsupported: ") + libxsmm_dnn_get_error(status);
    return c;
  }
  const size_t in_size = static_cast<size_t>(n) * l.c * l.h * l.w;
  const size_t out_size = static_cast<size_t>(n) * l.k * l.oh() * l.ow();
  const size_t w_size = static_cast<size_t>(l.k) * l.c * l.kernel * l.kernel;
  float* in = static_cast<float*>(libxsmm_aligned_malloc(in_size * 4, 2097152));
  float* out =
      static_cast<float*>(libxsmm_aligned_malloc(out_size * 4, 2097152));
  float* filter =
      static_cast<float*>(libxsmm_aligned_malloc(w_size * 4, 2097152));
  libxsmm_dnn_tensor_datalayout* layout;
  layout = libxsmm_dnn_create_tensor_datalayout(handle,
      LIBXSMM_DNN_REGULAR_INPUT, &status);
  libxsmm_dnn_tensor* t_in = libxsmm_dnn_link_tensor(layout, in, &status);
  libxsmm_dnn_destroy_tensor_datalayout(layout);
  layout = libxsmm_dnn_create_tensor_datalayout(handle,
      LIBXSMM_DNN_REGULAR_OUTPUT, &status);
  libxsmm_dnn_tensor* t_out = libxsmm_dnn_link_tensor(layout, out, &status);
  libxsmm_dnn_destroy_tensor_datalayout(layout);
  layout = libxsmm_dnn_create_tensor_datalayout(handle,
      LIBXSMM_DNN_REGULAR_FILTER, &status);
  libxsmm_dnn_tensor* t_w = libxsmm_dnn_link_tensor(layout, filter, &status);
  libxsmm_dnn_destroy_tensor_datalayout(layout);
  libxsmm_dnn_copyin_tensor(t_w, d->weights.data(),
      LIBXSMM_DNN_TENSOR_FORMAT_KCRS);
  libxsmm_dnn_bind_tensor(handle, t_in, LIBXSMM_DNN_REGULAR_INPUT);
  libxsmm_dnn_bind_tensor(handle, t_out, LIBXSMM_DNN_REGULAR_OUTPUT);
  libxsmm_dnn_bind_tensor(handle, t_w, LIBXSMM_DNN_REGULAR_FILTER);
  const size_t scratch_size =
      libxsmm_dnn_get_scratch_size(handle, LIBXSMM_DNN_COMPUTE_KIND_ALL,
          &status);
  void* scratch = libxsmm_aligned_scratch(scratch_size, 2097152);
  libxsmm_dnn_bind_scratch(handle, LIBXSMM_DNN_COMPUTE_KIND_ALL, scratch);
  const int positions = l.oh() * l.ow();
  c.run = [=]() {
    libxsmm_dnn_copyin_tensor(t_in, d->src.data(),
        LIBXSMM_DNN_TENSOR_FORMAT_NCHW);
    libxsmm_dnn_zero_tensor(t_out);  // its forward accumulates
#pragma omp parallel num_threads(threads)
    {
      libxsmm_dnn_execute_st(handle, LIBXSMM_DNN_COMPUTE_KIND_FWD, 0,
          omp_get_thread_num());
    }
    libxsmm_dnn_copyout_tensor(t_out, d->dst.data(),
        LIBXSMM_DNN_TENSOR_FORMAT_NCHW);
    for (int i = 0; i < n; ++i) {  // bias and ReLU (not fused here)
      for (int o = 0; o < l.k; ++o) {
        float* y = d->dst.data() + (i * l.k + o) * positions;
        for (int j = 0; j < positions; ++j) {
          y[j] = std::max(y[j] + d->bias[o], 0.f);
        }
      }
    }
  };
  c.ok = true;
  c.note = "libxsmm_dnn direct, NCHW copy-in/out timed, bias+ReLU pass";
  return c;
}
#endif

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t m = v.size() / 2;
  return v.size() % 2 ? v[m] : 0.5 * (v[m - 1] + v[m]);
}

std::string Escape(const std::string& s) {
  std::string out;
  for (char ch : s) {
    if (ch == '"' || ch == '\\') out += '\\';
    out += (ch == '\n' ? ' ' : ch);
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  int batch = 1, threads = 1, rounds = 15;
  double min_ms = 20;
  std::vector<Layer> layers;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--batch") {
      batch = std::atoi(argv[i + 1]);
    } else if (flag == "--threads") {
      threads = std::atoi(argv[i + 1]);
    } else if (flag == "--rounds") {
      rounds = std::atoi(argv[i + 1]);
    } else if (flag == "--min-ms") {
      min_ms = std::atof(argv[i + 1]);
    } else if (flag == "--layer") {
      Layer l;
      char name[64];
      if (std::sscanf(argv[i + 1], "%63[^,],%d,%d,%d,%d,%d,%d,%d", name, &l.c,
              &l.h, &l.w, &l.k, &l.kernel, &l.pad, &l.stride) != 8) {
        std::fprintf(stderr, "kernel_bench: bad --layer %s\n", argv[i + 1]);
        return 2;
      }
      l.name = name;
      layers.push_back(l);
    } else {
      std::fprintf(stderr, "kernel_bench: unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (layers.empty()) {
    std::fprintf(stderr, "kernel_bench: give at least one --layer\n");
    return 2;
  }
  openblas_set_num_threads(threads);
  omp_set_num_threads(threads);
  dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(engine);
  std::mt19937 rng(1704);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<Data> data(layers.size());
  std::vector<std::vector<Candidate> > candidates(layers.size());
  for (size_t li = 0; li < layers.size(); ++li) {
    const Layer& l = layers[li];
    Data& d = data[li];
    d.src.resize(static_cast<size_t>(batch) * l.c * l.h * l.w);
    for (float& v : d.src) v = std::max(0.f, normal(rng));  // rectified
    d.weights.resize(static_cast<size_t>(l.k) * l.c * l.kernel * l.kernel);
    const float scale =
        1.f / std::sqrt(static_cast<float>(l.c * l.kernel * l.kernel));
    for (float& v : d.weights) v = scale * normal(rng);
    d.bias.resize(l.k);
    for (float& v : d.bias) v = 0.1f * normal(rng);
    d.dst.resize(static_cast<size_t>(batch) * l.k * l.oh() * l.ow());
    candidates[li].push_back(CaffeCandidate(l, batch, &d));
    for (const char* mode : {"nchw", "blocked", "plain", "winograd"}) {
      candidates[li].push_back(
          DnnlCandidate(l, batch, &d, mode, &engine, &stream));
    }
#ifdef KERNEL_BENCH_LIBXSMM
    candidates[li].push_back(XsmmCandidate(l, batch, threads, &d));
#endif
  }
  // Agreement with the Caffe path, and iterations per timing (~min_ms).
  std::vector<std::vector<double> > diff(layers.size()), iters(layers.size());
  for (size_t li = 0; li < layers.size(); ++li) {
    Data& d = data[li];
    candidates[li][0].run();
    const std::vector<float> reference = d.dst;
    for (Candidate& c : candidates[li]) {
      double largest = 0, per = 0;
      if (c.ok) {
        std::fill(d.dst.begin(), d.dst.end(), -1.f);
        (c.check ? c.check : c.run)();
        const double t0 = Now();
        c.run();
        per = Now() - t0;
        for (size_t j = 0; j < reference.size(); ++j) {
          largest = std::max<double>(largest, std::fabs(d.dst[j] -
              reference[j]));
        }
      }
      diff[li].push_back(largest);
      iters[li].push_back(std::max(1.0, std::ceil(min_ms / 1e3 /
          std::max(per, 1e-7))));
    }
  }
  std::vector<std::vector<std::vector<double> > > times(layers.size());
  for (size_t li = 0; li < layers.size(); ++li) {
    times[li].resize(candidates[li].size());
  }
  for (int r = 0; r < rounds; ++r) {
    for (size_t li = 0; li < layers.size(); ++li) {
      for (size_t ci = 0; ci < candidates[li].size(); ++ci) {
        Candidate& c = candidates[li][ci];
        if (!c.ok) continue;
        const int count = iters[li][ci];
        const double t0 = Now();
        for (int k = 0; k < count; ++k) c.run();
        times[li][ci].push_back((Now() - t0) / count);
      }
    }
  }
  std::printf("{\"batch\": %d, \"threads\": %d, \"rounds\": %d, "
      "\"openblas\": \"%s\", \"onednn\": \"%d.%d.%d\", \"layers\": [",
      batch, threads, rounds, Escape(openblas_get_config()).c_str(),
      dnnl_version()->major, dnnl_version()->minor, dnnl_version()->patch);
  for (size_t li = 0; li < layers.size(); ++li) {
    const Layer& l = layers[li];
    std::printf("%s{\"name\": \"%s\", \"shape\": [%d, %d, %d, %d, %d, %d, %d],"
        " \"gflop\": %.6f, \"candidates\": [", li ? ", " : "", l.name.c_str(),
        l.c, l.h, l.w, l.k, l.kernel, l.pad, l.stride, l.Flops(batch) / 1e9);
    for (size_t ci = 0; ci < candidates[li].size(); ++ci) {
      const Candidate& c = candidates[li][ci];
      std::printf("%s{\"name\": \"%s\", \"ok\": %s, \"note\": \"%s\"",
          ci ? ", " : "", c.name.c_str(), c.ok ? "true" : "false",
          Escape(c.note).c_str());
      if (c.ok) {
        const double median = Median(times[li][ci]);
        std::printf(", \"ms\": %.6f, \"min_ms\": %.6f, \"gflops\": %.3f, "
            "\"max_abs_diff\": %.3g", median * 1e3,
            *std::min_element(times[li][ci].begin(), times[li][ci].end()) *
            1e3, l.Flops(batch) / median / 1e9, diff[li][ci]);
      }
      std::printf("}");
    }
    std::printf("]}");
  }
  std::printf("]}\n");
  return 0;
}
