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

namespace caffe {

/**
 * @brief A Convolution with DyVEDeep's dynamic effort knobs (SPET, exact
 *        early termination, SDSS, SFMA), per docs/knobs.md of DyVE-Caffe.
 *
 * It takes convolution_param and holds the same learnable blobs as
 * Convolution, so a stock caffemodel loads into it by layer name. The knobs
 * come from dyve_param; with all of them off the forward pass is the stock
 * one (followed by a ReLU when dyve_param.relu is set). With a knob on, each
 * image is evaluated on rows of gathered inputs (im2col transposed), and work
 * a knob skips is never executed.
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
      : ConvolutionLayer<Dtype>(param), weights_version_(0),
        state_stale_(true) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom,
      const vector<Blob<Dtype>*>& top);
  virtual void Reshape(const vector<Blob<Dtype>*>& bottom,
      const vector<Blob<Dtype>*>& top);
  virtual inline const char* type() const { return "DyveConvolution"; }

  virtual const DyveEffort& effort() const { return effort_; }
  virtual void ResetEffort() { effort_.Reset(); }
  virtual const DyveParameter& dyve_param() const { return dyve_param_; }
  virtual std::string SetDyveParam(const DyveParameter& param);

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
  /// What evaluating one image needs for itself; one per thread.
  struct ImageWork {
    std::vector<Dtype> rows, z, sfma_table, padded;
    std::vector<int> channel_offset;  // of the row's channels in padded
    DyveNeuronPlan<Dtype> reduced_plan;  // the plan without SFMA's maps
    typename DyveNeuronPlan<Dtype>::Scratch scratch;  // of the plan
    DyveEffort effort;
  };
  void RefreshWeightState();
  void ForwardImage(const Dtype* input, Dtype* output, ImageWork* work) const;
  /// Evaluates images [begin, end) of a bottom into its top.
  void ForwardImages(const Dtype* bottom, Dtype* top, int begin, int end,
      ImageWork* work) const;
  /// Copies one group's input maps into work->padded, zero padding included,
  /// so that gathering needs no bounds checks, and sets work->channel_offset
  /// to where each of the row's channels starts there.
  void PadInput(const Dtype* group_input, int group_channels,
      const std::vector<int>& row_channels, ImageWork* work) const;
  /// Gathers the row of output position p from work (after PadInput); may
  /// write kSlack values past the row.
  void GatherRow(int p, Dtype* row, const ImageWork* work) const;

  DyveParameter dyve_param_;
  DyveEffort effort_;
  uint64_t weights_version_;
  bool state_stale_;
  std::vector<DyveNeuronPlan<Dtype> > plans_;  // per group, no SFMA maps
  std::vector<int> tap_offset_;  // padded-input offset of each tap, row-major
  // SFMA: per output position, kind and summed-area table indices (Reshape).
  enum { kInterior = 0, kBorder = 1, kOutside = 2 };
  std::vector<int> sfma_rect_;
  std::vector<ImageWork> works_;  // per thread
};

}  // namespace caffe

#endif  // CAFFE_DYVE_CONV_LAYER_HPP_
