#ifndef CAFFE_DYVE_LAYER_HPP_
#define CAFFE_DYVE_LAYER_HPP_

#include <stdint.h>

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "caffe/common.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief Effort counters of one DyVE layer, accumulated over forward passes.
 *
 * Their exact meaning is fixed by docs/knobs.md; the numpy oracle
 * (python/dyve/pylayers.py) counts the same way. Invariant:
 * macs_dense = macs_executed + the four macs_skipped_* counters.
 */
struct DyveEffort {
  uint64_t forward_passes, images, outputs;
  uint64_t macs_dense, macs_executed;
  uint64_t macs_skipped_spet, macs_skipped_exact, macs_skipped_sdss,
      macs_skipped_sfma;
  uint64_t ops_spet, ops_exact, ops_sdss, ops_sfma;
  uint64_t spet_zeroed, exact_stopped, sdss_filled, sfma_maps;

  DyveEffort() { Reset(); }
  void Reset();
  /// (name, value) pairs in a fixed order, for printing and for pycaffe.
  std::vector<std::pair<std::string, uint64_t> > Items() const;
  /// One line: MACs executed of dense, then each knob's share and overhead.
  std::string Summary() const;
  /// Adds another set of counters (e.g. one thread's share of a batch).
  void Add(const DyveEffort& other);
};

/**
 * @brief What DyveConvolution and DyveInnerProduct have in common beyond
 *        Layer: their knob settings and their effort counters. The caffe CLI
 *        and pycaffe reach a DyVE layer through this interface.
 */
class DyveLayer {
 public:
  virtual ~DyveLayer() {}
  const DyveEffort& effort() const { return effort_; }
  void ResetEffort() { effort_.Reset(); }
  const DyveParameter& dyve_param() const { return dyve_param_; }
  /// Checks and applies new knob settings on a live layer, keeping its
  /// weights. Returns "" on success, else an error naming layer and field
  /// (the layer is then unchanged).
  virtual std::string SetDyveParam(const DyveParameter& param) = 0;

 protected:
  DyveLayer() : weights_version_(0), state_stale_(true) {}
  /// LayerSetUp's part: takes the layer's dyve_param and fails, naming the
  /// layer and the field, when it is not valid.
  void SetUpDyveParam(const LayerParameter& layer_param, const char* type,
      bool is_convolution);
  /// SetDyveParam's part: with no `error`, applies `param` (also to
  /// *layer_param) and marks the weight-derived state stale. Returns error.
  std::string ApplyDyveParam(const DyveParameter& param,
      const std::string& error, LayerParameter* layer_param);
  /// Whether the weight-derived state must be rebuilt for weights whose
  /// blob is at write version `version` (new weights or new settings).
  bool WeightStateStale(uint64_t version) const {
    return state_stale_ || version != weights_version_;
  }
  /// Records that the state was rebuilt for weights at `version`.
  void WeightStateRebuilt(uint64_t version) {
    weights_version_ = version;
    state_stale_ = false;
  }
  /// Backward's guard: fails, naming the layer, while a knob is on.
  void CheckBackwardAllowed(const char* type,
      const std::string& layer_name) const;

  DyveParameter dyve_param_;
  DyveEffort effort_;

 private:
  uint64_t weights_version_;
  bool state_stale_;
};

/// The largest value of an unsigned count field (spet.check_interval,
/// sdss.stride): the kernels hold them in int.
const uint32_t kMaxCount = 2147483647u;

/// Returns "" if `param` is valid for a layer of the given kind, else a
/// message naming the layer and the offending field.
std::string ValidateDyveParameter(const DyveParameter& param,
    const std::string& layer_type, const std::string& layer_name,
    bool is_convolution);

/// Threads BLAS may use (OPENBLAS_NUM_THREADS), 1 without OpenBLAS.
int BlasThreads();
/// Sets them (no-op without OpenBLAS).
void SetBlasThreads(int threads);

/// With fewer images than threads, DyveConvolution splits an image's output
/// positions over the threads only when one image costs at least this many
/// multiply-accumulates: below it, starting a thread costs more than it saves
/// (docs/kernels.md, "Batch 1 on 2 threads"). 2^24 unless the environment
/// variable DYVE_SPLIT_MACS gives another count (read once per process).
uint64_t PositionSplitMacs();
/// Sets it for this process (tests: 0 splits every layer).
void SetPositionSplitMacs(uint64_t macs);

/// True when any knob (SPET, exact mode, SDSS, SFMA) is on.
bool DyveKnobsOn(const DyveParameter& param);

/// Exact mode is only exact for non-negative inputs (after a ReLU): fails,
/// naming the layer and its bottom, when the `count` values `data` of bottom
/// `bottom_index` have a negative one.
template <typename Dtype>
void CheckExactModeInput(const Dtype* data, int count, const char* type,
    const LayerParameter& param, int bottom_index) {
  // The first value that is not >= 0: a NaN anywhere fails too (a minimum
  // misses it unless it comes first, since NaN compares false both ways).
  const Dtype* bad = std::find_if(data, data + count,
      [](Dtype value) { return !(value >= 0); });
  CHECK(bad == data + count) << type << " layer '" << param.name()
      << "': dyve_param.spet.exact needs non-negative inputs, but bottom '"
      << param.bottom(bottom_index) << "' has " << *bad
      << "; use exact mode only on layers whose input is rectified";
}

}  // namespace caffe

#endif  // CAFFE_DYVE_LAYER_HPP_
