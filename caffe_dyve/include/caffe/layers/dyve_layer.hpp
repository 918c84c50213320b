#ifndef CAFFE_DYVE_LAYER_HPP_
#define CAFFE_DYVE_LAYER_HPP_

#include <stdint.h>

#include <string>
#include <utility>
#include <vector>

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
  virtual const DyveEffort& effort() const = 0;
  virtual void ResetEffort() = 0;
  virtual const DyveParameter& dyve_param() const = 0;
  /// Checks and applies new knob settings on a live layer, keeping its
  /// weights. Returns "" on success, else an error naming layer and field
  /// (the layer is then unchanged).
  virtual std::string SetDyveParam(const DyveParameter& param) = 0;
};

/// Returns "" if `param` is valid for a layer of the given kind, else a
/// message naming the layer and the offending field.
std::string ValidateDyveParameter(const DyveParameter& param,
    const std::string& layer_type, const std::string& layer_name,
    bool is_convolution);

/// Threads BLAS may use (OPENBLAS_NUM_THREADS), 1 without OpenBLAS.
int BlasThreads();
/// Sets them (no-op without OpenBLAS).
void SetBlasThreads(int threads);

/// True when any knob (SPET, exact mode, SDSS, SFMA) is on.
bool DyveKnobsOn(const DyveParameter& param);

/**
 * @brief The neuron-level part of both DyVE layers: evaluates neurons with
 *        SPET (approximate, per-layer or per-output order) and exact mode on
 *        rows of inputs laid out in one fixed column order.
 *
 * A "row" holds the live inputs of one position (conv: taps of the live
 * channels in the plan's channel order; inner product: the input vector).
 * Dense and prefix sums (and the BOUND gate's bounds) run as GEMMs over many
 * rows; the gate is branch-free, and a row's surviving neurons are finished
 * four outputs per pass over the row (docs/performance.md has the numbers).
 * Exact mode and PER_OUTPUT orders go neuron by neuron.
 */
template <typename Dtype>
class DyveNeuronPlan {
 public:
  /// Weight-derived channel orders of one group: `weights` is O x (C*KK) in
  /// natural order. Called whenever the weights or settings change.
  void ComputeOrders(const DyveParameter& param, const Dtype* weights,
      int num_output, int channels, int taps);
  /// Builds the plan for the live channels (`constant[c]` marks the channels
  /// SFMA removed; empty = none).
  void Build(const DyveParameter& param, const Dtype* weights,
      const std::vector<bool>& constant);

  /// Live channels in row order.
  const std::vector<int>& row_channels() const { return row_channels_; }
  int row_length() const { return row_length_; }

  /// z holds rows x num_output initial values (bias and SFMA term); on return
  /// it holds the outputs (after ReLU when param.relu()).
  void EvaluateRows(const Dtype* rows, int num_rows, Dtype* z,
      DyveEffort* effort) const;
  /// True when SPET's BOUND gate needs the rest channels' maxima of a row.
  bool uses_bound() const { return bound_; }
  /// Length of the vector RowMaxima writes (live rest channels).
  int rest_channels() const { return rest_channels_; }
  /// The maximum of each live rest channel's taps in one row (BOUND gate).
  void RowMaxima(const Dtype* row, Dtype* maxima, DyveEffort* effort) const;
  /// Evaluates neuron o on one row, starting from z_init; `maxima` comes from
  /// RowMaxima for the BOUND gate (else unused, may be NULL).
  Dtype EvaluateNeuron(const Dtype* row, const Dtype* maxima, int o,
      Dtype z_init, DyveEffort* effort) const;

  /// Evaluates the listed outputs on one row, as EvaluateNeuron would each:
  /// z[i] holds the initial value of output outputs[i], on return its output.
  void EvaluateSelected(const Dtype* row, const Dtype* maxima,
      const int* outputs, int count, Dtype* z, DyveEffort* effort) const;

 private:
  /// sums[i] = the dot product of the n values x with columns [offset,
  /// offset + n) of output outputs[i]'s weights; four outputs per pass.
  void DotOutputs(const Dtype* x, int offset, int n, const int* outputs,
      int count, Dtype* sums) const;
  /// The BOUND gate's U for output o from a row's rest maxima (0 without the
  /// gate or with an empty rest), counted in ops_spet.
  Dtype RestBound(const Dtype* maxima, int o, DyveEffort* effort) const;
  /// Finishes neuron o after its prefix sum z; `bound` is the BOUND gate's U.
  Dtype Finish(const Dtype* row, int o, Dtype z, Dtype bound,
      DyveEffort* effort) const;

  DyveParameter param_;
  int num_output_, channels_, taps_;
  // Orders from the weights (ComputeOrders).
  std::vector<int> layer_order_;
  std::vector<std::vector<int> > output_order_;
  // The plan for one set of live channels (Build).
  std::vector<int> row_channels_;
  int row_length_;
  int prefix_length_;                  // PER_LAYER: leading taps of a row
  std::vector<Dtype> row_weights_;     // O x row_length_, row order
  // BOUND gate: per output, the sum of the positive taps of each live rest
  // channel (O x rest_channels_).
  bool bound_;
  int rest_channels_;
  std::vector<Dtype> rest_positive_;
  // PER_OUTPUT: per neuron, the prefix and the rest as row indices, with
  // their weights in the same order.
  std::vector<std::vector<int> > prefix_index_, rest_index_;
  std::vector<std::vector<Dtype> > prefix_weight_, rest_weight_;
  // Exact mode: per neuron, the rest split by weight sign, in rest order.
  std::vector<std::vector<int> > positive_index_, negative_index_;
  std::vector<std::vector<Dtype> > positive_weight_, negative_weight_;
};

}  // namespace caffe

#endif  // CAFFE_DYVE_LAYER_HPP_
