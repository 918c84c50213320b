#include <cmath>
#include <cstdlib>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "caffe/common.hpp"
#include "caffe/layers/dyve_layer.hpp"
#include "caffe/util/mkl_alternate.hpp"

namespace caffe {

// Every counter of DyveEffort in its fixed order (Items, hence pycaffe and
// the CLI); Reset and Add follow the same list.
#define DYVE_EFFORT_FIELDS(X) \
  X(forward_passes) X(images) X(outputs) X(macs_dense) X(macs_executed) \
  X(macs_skipped_spet) X(macs_skipped_exact) X(macs_skipped_sdss) \
  X(macs_skipped_sfma) X(ops_spet) X(ops_exact) X(ops_sdss) X(ops_sfma) \
  X(spet_zeroed) X(exact_stopped) X(sdss_filled) X(sfma_maps)

void DyveEffort::Reset() {
#define DYVE_ZERO(name) name = 0;
  DYVE_EFFORT_FIELDS(DYVE_ZERO)
#undef DYVE_ZERO
}

void DyveEffort::Add(const DyveEffort& other) {
#define DYVE_ADD(name) name += other.name;
  DYVE_EFFORT_FIELDS(DYVE_ADD)
#undef DYVE_ADD
}

std::vector<std::pair<std::string, uint64_t> > DyveEffort::Items() const {
  std::vector<std::pair<std::string, uint64_t> > items;
#define DYVE_ITEM(name) \
  items.push_back(std::make_pair(std::string(#name), name));
  DYVE_EFFORT_FIELDS(DYVE_ITEM)
#undef DYVE_ITEM
  return items;
}

std::string DyveEffort::Summary() const {
  std::ostringstream out;
  const double dense = macs_dense > 0 ? static_cast<double>(macs_dense) : 1.0;
  const uint64_t overhead = ops_spet + ops_exact + ops_sdss + ops_sfma;
  out << "images " << images << ", MACs executed " << macs_executed << " of "
      << macs_dense << " (" << 100.0 * macs_executed / dense << "%); skipped:"
      << " spet " << 100.0 * macs_skipped_spet / dense << "%,"
      << " exact " << 100.0 * macs_skipped_exact / dense << "%,"
      << " sdss " << 100.0 * macs_skipped_sdss / dense << "%,"
      << " sfma " << 100.0 * macs_skipped_sfma / dense << "%;"
      << " overhead ops " << overhead << "; neurons zeroed by spet "
      << spet_zeroed << ", stopped by exact " << exact_stopped
      << ", filled by sdss " << sdss_filled << "; maps replaced by sfma "
      << sfma_maps;
  return out.str();
}

int BlasThreads() {
#ifdef OPENBLAS_VERSION
  return openblas_get_num_threads();
#else
  return 1;
#endif
}

void SetBlasThreads(int threads) {
#ifdef OPENBLAS_VERSION
  openblas_set_num_threads(threads);
#endif
}

namespace {

uint64_t ReadPositionSplitMacs() {
  const char* text = std::getenv("DYVE_SPLIT_MACS");
  if (text == NULL || *text == '\0') return uint64_t(1) << 24;
  char* end = NULL;
  const unsigned long long macs = std::strtoull(text, &end, 10);  // NOLINT
  CHECK(*end == '\0' && text[0] != '-')
      << "DYVE_SPLIT_MACS must be a count of multiply-accumulates, got '"
      << text << "'";
  return macs;
}

uint64_t position_split_macs = ReadPositionSplitMacs();

}  // namespace

uint64_t PositionSplitMacs() { return position_split_macs; }

void SetPositionSplitMacs(uint64_t macs) { position_split_macs = macs; }

bool DyveKnobsOn(const DyveParameter& param) {
  return param.spet().enabled() || param.spet().exact() ||
      param.sdss().enabled() || param.sfma().enabled();
}

void DyveLayer::SetUpDyveParam(const LayerParameter& layer_param,
    const char* type, bool is_convolution) {
  dyve_param_ = layer_param.dyve_param();
  const std::string error = ValidateDyveParameter(dyve_param_, type,
      layer_param.name(), is_convolution);
  CHECK(error.empty()) << error;
}

std::string DyveLayer::ApplyDyveParam(const DyveParameter& param,
    const std::string& error, LayerParameter* layer_param) {
  if (!error.empty()) return error;
  dyve_param_ = param;
  *layer_param->mutable_dyve_param() = param;
  state_stale_ = true;
  return "";
}

void DyveLayer::CheckBackwardAllowed(const char* type,
    const std::string& layer_name) const {
  CHECK(!DyveKnobsOn(dyve_param_)) << type << " layer '" << layer_name
      << "': Backward is not available while a dyve_param knob is on (the "
      << "forward pass is approximate); train with every knob off";
}

std::string ValidateDyveParameter(const DyveParameter& param,
    const std::string& layer_type, const std::string& layer_name,
    bool is_convolution) {
  std::ostringstream error;
  const std::string where = layer_type + " layer '" + layer_name + "': ";
  const DyveSpetParameter& spet = param.spet();
  if (!(spet.fraction() > 0 && spet.fraction() <= 1)) {
    error << where << "dyve_param.spet.fraction must be in (0, 1], got "
          << spet.fraction();
  } else if (spet.check_interval() < 1 || spet.check_interval() > kMaxCount) {
    // The kernels count in int: a larger uint32 would wrap negative.
    error << where << "dyve_param.spet.check_interval must be in [1, "
          << kMaxCount << "], got " << spet.check_interval();
  } else if ((spet.enabled() || spet.exact()) && !param.relu()) {
    error << where << "dyve_param.spet needs a rectified output: SPET and "
          << "exact mode predict ReLU saturation, so set dyve_param.relu: true";
  } else if (!std::isfinite(spet.threshold())) {
    error << where << "dyve_param.spet.threshold must be finite";
  } else if (!(spet.bound_scale() >= 0) || !std::isfinite(spet.bound_scale())) {
    error << where << "dyve_param.spet.bound_scale must be finite and >= 0, "
          << "got " << spet.bound_scale();
  } else if (spet.gate() == DyveSpetParameter_Gate_BOUND && !spet.enabled()) {
    error << where << "dyve_param.spet.gate BOUND gates approximate SPET, so "
          << "it needs dyve_param.spet.enabled: true";
  } else if (spet.gate() == DyveSpetParameter_Gate_BOUND &&
             spet.ordering() == DyveSpetParameter_Ordering_PER_OUTPUT) {
    error << where << "dyve_param.spet.gate BOUND needs "
          << "dyve_param.spet.ordering PER_LAYER or INTERLEAVED (one channel "
          << "order per group)";
  } else if (spet.gate() == DyveSpetParameter_Gate_BOUND && !is_convolution) {
    error << where << "dyve_param.spet.gate BOUND applies to convolutions only "
          << "(an inner product's bound would cost as much as its rest)";
  } else if (!is_convolution && param.sdss().enabled()) {
    error << where << "dyve_param.sdss applies to convolutions only";
  } else if (!is_convolution && param.sfma().enabled()) {
    error << where << "dyve_param.sfma applies to convolutions only";
  } else if (param.sdss().stride() < 1 || param.sdss().stride() > kMaxCount) {
    error << where << "dyve_param.sdss.stride must be in [1, " << kMaxCount
          << "], got " << param.sdss().stride();
  } else if (!(param.sdss().threshold() >= 0) ||
             !std::isfinite(param.sdss().threshold())) {
    error << where << "dyve_param.sdss.threshold must be finite and >= 0, got "
          << param.sdss().threshold();
  } else if (!(param.sdss().range_threshold() >= 0)) {
    error << where << "dyve_param.sdss.range_threshold must be >= 0 (inf: no "
          << "range test), got " << param.sdss().range_threshold();
  } else if (param.sdss().enabled() && !param.relu()) {
    error << where << "dyve_param.sdss needs a rectified output (its "
          << "significance test reads post-ReLU values), so set "
          << "dyve_param.relu: true";
  } else if (!(param.sfma().threshold() >= 0) ||
             !std::isfinite(param.sfma().threshold())) {
    error << where << "dyve_param.sfma.threshold must be finite and >= 0, got "
          << param.sfma().threshold();
  } else if (!(param.sfma().kernel_threshold() >= 0)) {
    error << where << "dyve_param.sfma.kernel_threshold must be >= 0 (inf: no "
          << "kernel test), got " << param.sfma().kernel_threshold();
  }
  return error.str();
}

}  // namespace caffe
