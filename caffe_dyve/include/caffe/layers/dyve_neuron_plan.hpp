#ifndef CAFFE_DYVE_NEURON_PLAN_HPP_
#define CAFFE_DYVE_NEURON_PLAN_HPP_

#include <vector>

#include "caffe/layers/dyve_layer.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief The neuron-level part of both DyVE layers: evaluates neurons with
 *        SPET (approximate, per-layer, interleaved or per-output order) and
 *        exact mode on rows of inputs laid out in one fixed column order.
 *        INTERLEAVED is one order per group like PER_LAYER and takes its
 *        paths.
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
  /// Buffers of one evaluation, owned by the caller (one per thread, since a
  /// layer may evaluate several images at once) and reused across calls.
  struct Scratch {
    std::vector<Dtype> maxima, bounds, sums;
    std::vector<int> survivors, kept;
  };

  /// Weight-derived channel orders of one group: `weights` is O x (C*KK) in
  /// natural order. Called whenever the weights or settings change.
  void ComputeOrders(const DyveParameter& param, const Dtype* weights,
      int num_output, int channels, int taps);
  /// Takes another plan's orders (ComputeOrders' result) without its built
  /// state: an image's plan without SFMA's maps starts from the layer's, and
  /// copying all of it cost a quarter of the layer (docs/kernels.md).
  void CopyOrders(const DyveNeuronPlan& other);
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
      Scratch* scratch, DyveEffort* effort) const;
  /// True when approximate SPET splits every row into the same prefix and
  /// rest (PER_LAYER or INTERLEAVED order, not exact mode): the prefix sums
  /// can then come from elsewhere (a dense kernel) and EvaluateRest go on.
  bool splits_prefix() const {
    return param_.spet().enabled() && !param_.spet().exact() &&
        param_.spet().ordering() != DyveSpetParameter_Ordering_PER_OUTPUT;
  }
  /// Leading taps of a row that form SPET's prefix in a per-layer or
  /// interleaved order (0 without SPET or with PER_OUTPUT).
  int prefix_length() const { return prefix_length_; }
  /// The prefix's weights, num_output x prefix_length() in row order.
  void PrefixWeights(std::vector<Dtype>* weights) const;
  /// EvaluateRows after the prefix: z holds rows x num_output initial values
  /// plus prefix sums, and rest_rows the rows' rest taps (row_length() -
  /// prefix_length() each). Counts the prefix as EvaluateRows does; needs
  /// splits_prefix().
  void EvaluateRest(const Dtype* rest_rows, int num_rows, Dtype* z,
      Scratch* scratch, DyveEffort* effort) const;
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
      const int* outputs, int count, Dtype* z, Scratch* scratch,
      DyveEffort* effort) const;

 private:
  /// sums[i] = the dot product of the n values x with columns [offset,
  /// offset + n) of output outputs[i]'s weights; four outputs per pass.
  void DotOutputs(const Dtype* x, int offset, int n, const int* outputs,
      int count, Dtype* sums) const;
  /// The BOUND gate's U of every neuron of num_rows rows whose rest taps
  /// start `stride` values apart (NULL without the gate), in scratch->bounds.
  const Dtype* RowBounds(const Dtype* rest, int stride, int num_rows,
      Scratch* scratch, DyveEffort* effort) const;
  /// Gate and survivors of num_rows rows after their prefix sums (z).
  void FinishRows(const Dtype* rest, int stride, int num_rows, Dtype* z,
      Scratch* scratch, DyveEffort* effort) const;
  /// RowMaxima on a row's rest taps.
  void RestMaxima(const Dtype* rest, Dtype* maxima, DyveEffort* effort) const;
  /// SPET's gate (the one place it is decided and counted), branch-free over
  /// n neurons of one row: neuron i is zeroed when z[i] + s * bounds[i] < T,
  /// or z[i] < T without bounds (NULL). Writes the survivors' indices to
  /// survivors and returns their count; counts the compares, the zeroed
  /// neurons and the `rest_length` taps each zeroed one skips.
  int Gate(int n, const Dtype* bounds, int rest_length, Dtype* z,
      int* survivors, DyveEffort* effort) const;
  /// The ReLU over n outputs when param.relu() (neurons the gate zeroed are
  /// 0 already and stay so).
  void Rectify(int n, Dtype* z) const;
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

#endif  // CAFFE_DYVE_NEURON_PLAN_HPP_
