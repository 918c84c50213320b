#ifndef CAFFE_DYVE_CONV_LAYER_HPP_
#define CAFFE_DYVE_CONV_LAYER_HPP_

#include <string>
#include <vector>

#include "caffe/blob.hpp"
#include "caffe/layer.hpp"
#include "caffe/layers/conv_layer.hpp"
#include "caffe/layers/dyve_layer.hpp"
#include "caffe/layers/dyve_neuron_plan.hpp"
#include "caffe/proto/caffe.pb.h"
#include "caffe/util/dyve_dnnl.hpp"

namespace caffe {

/**
 * @brief A Convolution with DyVEDeep's dynamic effort knobs (SPET, exact
 *        early termination, SDSS, SFMA), per docs/knobs.md of DyVE-Caffe.
 *
 * It takes convolution_param and holds the same learnable blobs as
 * Convolution, so a stock caffemodel loads into it by layer name. The knobs
 * come from dyve_param; with all of them off the forward pass is the stock
 * convolution (followed by a ReLU when dyve_param.relu is set), computed by
 * oneDNN for float blobs where the build has it (bias and ReLU fused; see
 * DyveDnnlConvolution), else by Caffe's im2col + BLAS. With a knob on, each
 * image is evaluated on rows of gathered inputs (im2col transposed), and work
 * a knob skips is never executed. Where SPET splits every row into the same
 * prefix and rest (float blobs, one group), oneDNN computes the prefix sums
 * as a convolution over the prefix channels, at SDSS's grid stride with SDSS
 * on, and the rows hold the rest only (prefix_path()).
 *
 * Weight-derived state (channel orders, sign splits, kernel sums) is rebuilt
 * on the first forward after the weights change, as seen through the weight
 * blob's write version: after CopyTrainedLayersFrom or a pycaffe assignment,
 * never from the fillers of set-up.
 *
 * Backward delegates to Convolution's gradient (masked by the ReLU) and is
 * refused while a knob is on.
 */
template <typename Dtype>
class DyveConvolutionLayer : public ConvolutionLayer<Dtype>, public DyveLayer {
 public:
  explicit DyveConvolutionLayer(const LayerParameter& param)
      : ConvolutionLayer<Dtype>(param), dense_ready_(false),
        dense_bands_(false), dense_threads_(0), prefix_ready_(false),
        prefix_bands_(false), prefix_generation_(0) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom,
      const vector<Blob<Dtype>*>& top);
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom,
      const vector<Blob<Dtype>*>& top);
  virtual inline const char* type() const { return "DyveConvolution"; }

  virtual std::string SetDyveParam(const DyveParameter& param);
  /// The knobs-off kernel prepared for the current shapes: "oneDNN " and
  /// its implementation (e.g. "oneDNN jit:avx2"), with " in N row bands"
  /// where a batch smaller than the thread count splits its positions, or
  /// "caffe" (im2col + BLAS).
  std::string dense_path() const;
  /// Where the knob path takes SPET's prefix sums from, as prepared by the
  /// last forward: "oneDNN " and its implementation (a convolution over the
  /// prefix channels, docs/kernels.md), or "rows" (gathered rows and BLAS).
  std::string prefix_path() const;

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom,
      const vector<Blob<Dtype>*>& top);
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top,
      const vector<bool>& propagate_down, const vector<Blob<Dtype>*>& bottom);

 private:
  /// Rows gathered and evaluated per pass (400 KB for 5x5x32 taps).
  static const int kRowsPerPass = 128;
  /// Room past a gathered row or the padded maps for 8-wide copies.
  static const int kSlack = 8;
  /// Error for settings that conflict with the current shapes, or "".
  std::string CheckShapes(const DyveParameter& param) const;
  /// What evaluating one image needs for itself; one per thread. In a split
  /// of one image's positions, works_[0] holds the image's state (its padded
  /// input, prefix sums, SFMA table, grid) and each thread's work its own
  /// scratch and counters.
  struct ImageWork {
    ImageWork()
        : bias(NULL), constant_count(0), sfma_skipped(0), table_size(0),
          grid_width(0), prefix_dense(false), prefix_generation(0),
          prefix_bias_version(0), prefix_source(NULL) {}
    std::vector<Dtype> rows, z, sfma_table, padded;
    std::vector<int> channel_offset;  // of the row's channels in padded
    // SFMA: the image's constant maps and every map's mean.
    std::vector<bool> constant, group_constant;
    std::vector<int> constant_channels;  // of the group
    std::vector<Dtype> mean;
    // The group being evaluated: its biases (NULL without), its number of
    // constant maps, the MACs they skip per computed neuron and the size of
    // one output's summed-area table.
    const Dtype* bias;
    int constant_count, sfma_skipped, table_size;
    DyveNeuronPlan<Dtype> reduced_plan;  // the plan without SFMA's maps
    typename DyveNeuronPlan<Dtype>::Scratch scratch;  // of the plan
    // Grid positions (row-major, grid_width per row); SDSS's row and its
    // computed outputs.
    std::vector<int> grid, computed;
    int grid_width;
    std::vector<Dtype> row, maxima, values;
    // SPET's prefix on oneDNN: whether the group being evaluated takes it,
    // this thread's kernel (with the plan generation and bias version its
    // weights came from), its input (the prefix channels) and output (the
    // prefix sums of the grid positions, output-major), and the rest's
    // channels.
    bool prefix_dense;
    shared_ptr<DyveDnnlConvolution> prefix_kernel;
    uint64_t prefix_generation, prefix_bias_version;
    std::vector<Dtype> prefix_input, prefix_sums;
    const Dtype* prefix_source;  // the kernel's input: group or prefix_input
    std::vector<int> rest_channels;
    DyveEffort effort;
  };
  void RefreshWeightState();
  /// The dense multiply-accumulates of one image.
  uint64_t ImageMacs() const;
  /// The layer's convolution for oneDNN: the current shapes, its bias and
  /// dyve_param.relu (2 spatial axes).
  DyveConvShape KernelShape() const;
  /// Knobs off: prepares the oneDNN kernels for the current shapes (float
  /// blobs, 2 spatial axes), one per thread's share of the batch, or, with
  /// fewer images than threads, one per thread's band of output rows; sets
  /// dense_ready_ and dense_bands_.
  void ConfigureDense();
  /// Knobs off: the forward through oneDNN, bias and ReLU included, if
  /// dense_ready_; returns whether it ran (else Caffe's path must). The
  /// images (or the output rows) split over as many threads as BLAS may use,
  /// one oneDNN thread each (docs/kernels.md: OpenMP's barriers stall on a
  /// busy machine).
  bool ForwardDense(const vector<Blob<Dtype>*>& bottom,
      const vector<Blob<Dtype>*>& top);
  /// Knob path: prepares the first `threads` works' kernels for SPET's
  /// prefix (float blobs, one group, SPET splitting every row the same way)
  /// for the current plan, weights and shapes, each for the whole grid or,
  /// with `bands`, for thread t's band of grid rows; sets prefix_ready_.
  void ConfigurePrefix(int threads, bool bands);
  /// Readies the prefix kernel's input (the prefix channels in row order:
  /// work->prefix_source) and output (work->prefix_sums, the group's grid
  /// positions output-major).
  void PreparePrefix(const Dtype* group_input,
      const DyveNeuronPlan<Dtype>& plan, ImageWork* work) const;
  /// The rows of the grid a thread of `split` takes in a position split
  /// (all of them for split 1): [*begin, *end) of grid_rows.
  static void SplitRows(int rows, int t, int split, int* begin, int* end);
  /// Evaluates one image: its constant maps (SFMA), then per group the grid
  /// positions and the SDSS fill. With split > 1 the positions split over
  /// that many threads by rows of the output, works[t] holding thread t's
  /// scratch and counters and works[0] the image's state.
  void ForwardImage(const Dtype* input, Dtype* output, ImageWork* works,
      int split) const;
  /// Evaluates images [begin, end) of a bottom into its top.
  void ForwardImages(const Dtype* bottom, Dtype* top, int begin, int end,
      ImageWork* work) const;
  /// SFMA's detection: marks the image's (nearly) constant input maps in
  /// work->constant and their means in work->mean.
  void FindConstantMaps(const Dtype* input, ImageWork* work) const;
  /// SFMA for group g: with constant maps, builds the plan without them
  /// (work->reduced_plan) and the summed-area table of their summed kernel
  /// (work->sfma_table). Sets work->constant_count; returns the plan to use.
  const DyveNeuronPlan<Dtype>& BuildSfmaTable(int g, ImageWork* work) const;
  /// The initial value of computed neuron o at position p of the group:
  /// its bias plus SFMA's term, the constant maps' contribution over the taps
  /// inside the input (from the table).
  /// `image` holds the image's state, `work` the thread's counters.
  Dtype InitialValue(int o, int p, const ImageWork& image,
      ImageWork* work) const;
  /// SFMA's term alone (0 without constant maps), counted as InitialValue.
  Dtype SfmaTerm(int o, int p, const ImageWork& image, ImageWork* work) const;
  /// Lists the group's grid positions (every position without SDSS) in
  /// work->grid, row-major, and sets work->grid_width.
  void ListGridPositions(ImageWork* work) const;
  /// Evaluates the grid positions in grid rows [row_begin, row_end) as
  /// gathered rows, kRowsPerPass at a time; SPET and exact mode act inside
  /// the plan. `image`: the image's state (padded input, prefix sums, SFMA
  /// table); `work`: this thread's scratch and counters.
  void EvaluateGridPositions(const DyveNeuronPlan<Dtype>& plan,
      Dtype* group_output, const ImageWork& image, int row_begin, int row_end,
      ImageWork* work) const;
  /// SDSS: fills every other position of output rows [row_begin, row_end)
  /// from its grid neighbours when they are all insignificant (and, with a
  /// finite range_threshold, their range is small), else computes it.
  void FillSdssPositions(const DyveNeuronPlan<Dtype>& plan,
      Dtype* group_output, const ImageWork& image, int row_begin, int row_end,
      ImageWork* work) const;
  /// Copies the listed input maps of one group into work->padded, zero
  /// padding included, so that gathering needs no bounds checks.
  void PadInput(const Dtype* group_input, int group_channels,
      const std::vector<int>& channels, ImageWork* work) const;
  /// Sets work->channel_offset to where each of a row's channels starts in
  /// work->padded: GatherRow then gathers rows of these channels.
  void SetRowChannels(const std::vector<int>& row_channels,
      ImageWork* work) const;
  /// Gathers the row of output position p from work (after PadInput); may
  /// write kSlack values past the row.
  void GatherRow(int p, Dtype* row, const ImageWork* work) const;

  std::vector<DyveNeuronPlan<Dtype> > plans_;  // per group, no SFMA maps
  // SFMA's kernel test (sfma.kernel_threshold), per input channel: whether
  // its kernel slices are small enough for the map to be replaced. Empty
  // (every channel may be) with the default inf. Weight-derived.
  std::vector<bool> sfma_kernel_ok_;
  std::vector<int> tap_offset_;  // padded-input offset of each tap, row-major
  // SFMA: per output position, kind and summed-area table indices (Reshape).
  enum { kInterior = 0, kBorder = 1, kOutside = 2 };
  std::vector<int> sfma_rect_;
  std::vector<ImageWork> works_;  // per thread
  // The knobs-off kernels, one per thread (the first dense_threads_ used):
  // ready for the current shapes or not (then Caffe's path runs), and per
  // kernel the write versions of the weights and bias it holds.
  std::vector<shared_ptr<DyveDnnlConvolution> > dense_;
  bool dense_ready_, dense_bands_;
  int dense_threads_;
  std::vector<uint64_t> dense_weights_version_, dense_bias_version_;
  // SPET's prefix on oneDNN: ready for the current settings and shapes (in
  // bands of grid rows for a position split or not), the
  // generation of the plans (counted up whenever they are rebuilt), and the
  // prefix's weights (PrefixWeights of plans_[0]).
  bool prefix_ready_, prefix_bands_;
  uint64_t prefix_generation_;
  std::vector<Dtype> prefix_weights_;
};

}  // namespace caffe

#endif  // CAFFE_DYVE_CONV_LAYER_HPP_
