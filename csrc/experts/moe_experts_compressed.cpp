// remoe::moe_experts_compressed: the compute plan and the input checks both backends share.

#include "moe_experts_compressed.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace remoe {

CompressedPlan parse_compute_plan(const at::Tensor& plan, const MoeExpertsParams& p,
                                  int64_t blob_bytes, at::ScalarType dense_dtype) {
  TORCH_CHECK(plan.dim() == 2 && plan.size(1) == kComputeFields && plan.size(0) >= 2 &&
                  plan.scalar_type() == at::kLong && plan.device().is_cpu(),
              "moe_experts_compressed: plan must be a CPU int64 [parts >= 2, ", kComputeFields,
              "] tensor, got ", plan.scalar_type(), " ", plan.sizes(), " on ", plan.device());
  const int64_t H = p.hidden, N = p.up_rows, I = p.ffn;
  const int64_t rows_of[kNumParams] = {N, 1, H, 1};
  const int64_t cols_of[kNumParams] = {H, N, I, H};
  const char* names[kNumParams] = {"up", "up_bias", "down", "down_bias"};
  CompressedPlan cp;
  int64_t base = 0;
  for (int64_t m = 0; m < kNumParams; ++m) {
    cp.param_base[m] = base;
    base += rows_of[m] * cols_of[m];
  }
  cp.dense_elements = base;
  const at::Tensor t = plan.contiguous();
  const int64_t n = t.size(0);
  const int64_t* row = t.data_ptr<int64_t>();
  const int64_t elem = c10::elementSize(dense_dtype);
  at::Tensor dense_plan = at::empty({n, kDequantFields}, at::kLong);
  int64_t* d = dense_plan.data_ptr<int64_t>();
  std::vector<int64_t> covered[kNumParams];
  for (int64_t m = 0; m < kNumParams; ++m) covered[m].assign(rows_of[m], -1);
  for (int64_t i = 0; i < n; ++i, row += kComputeFields, d += kDequantFields) {
    const int64_t m = row[0], r0 = row[1], rows = row[3], cols = row[4];
    TORCH_CHECK(m >= 0 && m < kNumParams, "moe_experts_compressed: plan part ", i, " fills matrix ",
                m, ", not one of 0 (up), 1 (up_bias), 2 (down), 3 (down_bias)");
    TORCH_CHECK(rows >= 1 && r0 >= 0 && r0 + rows <= rows_of[m] && cols == cols_of[m],
                "moe_experts_compressed: plan part ", i, " (", rows, " x ", cols, " at row ", r0,
                ") does not fit ", names[m], " [", rows_of[m], ", ", cols_of[m], "]");
    for (int64_t r = r0; r < r0 + rows; ++r) {
      TORCH_CHECK(covered[m][r] < 0, "moe_experts_compressed: plan parts ", covered[m][r],
                  " and ", i, " both fill row ", r, " of ", names[m]);
      covered[m][r] = i;
    }
    cp.has[m] = true;
    cp.param.push_back(m);
    cp.row0.push_back(r0);
    // code_kind, rows, cols, block_rows, block_cols, code_offset, scale_kind, scale_offset,
    // zero_offset, then the dense destination (bytes, row stride, column stride).
    for (int f = 0; f < 9; ++f) d[f] = row[2 + f];
    d[9] = (cp.param_base[m] + r0 * cols) * elem;
    d[10] = cols;
    d[11] = 1;
  }
  TORCH_CHECK(cp.has[kParamUp] && cp.has[kParamDown], "moe_experts_compressed: the plan has no ",
              cp.has[kParamUp] ? "down" : "up", " projection");
  for (int64_t m = 0; m < kNumParams; ++m) {
    if (!cp.has[m]) continue;
    for (int64_t r = 0; r < rows_of[m]; ++r) {
      TORCH_CHECK(covered[m][r] >= 0, "moe_experts_compressed: no plan part fills row ", r,
                  " of ", names[m], " [", rows_of[m], ", ", cols_of[m], "]");
    }
    cp.part_of_row[m].assign(covered[m].begin(), covered[m].end());
  }
  cp.parts = parse_dequant_plan(dense_plan, blob_bytes, cp.dense_elements * elem, dense_dtype,
                                nullptr);
  return cp;
}

CompressedPlan check_compressed_inputs(const at::Tensor& hidden, const at::Tensor& slots,
                                       const at::Tensor& route_weights, const at::Tensor& blobs,
                                       const at::Tensor& plan, int64_t up_rows,
                                       std::string_view gate, std::string_view activation,
                                       std::string_view clamp, double limit, double alpha,
                                       double up_offset, MoeExpertsParams* out) {
  MoeExpertsParams p = check_routed_inputs(hidden, slots, route_weights, gate, activation, clamp,
                                           limit, alpha, up_offset);
  set_up_rows(p, up_rows);
  TORCH_CHECK(blobs.dim() == 2 && blobs.scalar_type() == at::kByte && blobs.stride(1) == 1 &&
                  blobs.device() == hidden.device(),
              "moe_experts_compressed: blobs must be uint8 [slots, blob_bytes] on ",
              hidden.device(), " with dense rows, got ", blobs.scalar_type(), " ", blobs.sizes(),
              " strides ", blobs.strides(), " on ", blobs.device());
  p.num_slots = blobs.size(0);
  CompressedPlan cp = parse_compute_plan(plan, p, blobs.size(1), hidden.scalar_type());
  p.has_up_bias = cp.has[kParamUpBias];
  p.has_down_bias = cp.has[kParamDownBias];
  *out = p;
  return cp;
}

std::vector<int64_t> routed_slots(const int64_t* slots, const MoeExpertsParams& p) {
  std::vector<int64_t> used;
  for (int64_t pair : pairs_by_slot(slots, p)) {  // sorted by slot
    if (used.empty() || used.back() != slots[pair]) used.push_back(slots[pair]);
  }
  return used;
}

at::Tensor chunk_slot_ids(const at::Tensor& slots, const std::vector<int64_t>& used,
                          int64_t begin, int64_t n, int64_t num_slots) {
  std::vector<int64_t> local(num_slots, -1);
  for (int64_t i = 0; i < n; ++i) local[used[begin + i]] = i;
  at::Tensor ids = at::empty_like(slots);
  const int64_t* s = slots.data_ptr<int64_t>();
  int64_t* out = ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < slots.numel(); ++i) out[i] = s[i] >= 0 ? local[s[i]] : -1;
  return ids;
}

DenseExperts dense_views(const at::Tensor& scratch, const CompressedPlan& cp,
                         const MoeExpertsParams& p) {
  const int64_t n = scratch.size(0), H = p.hidden, N = p.up_rows, I = p.ffn;
  const auto view = [&](int64_t m, std::vector<int64_t> shape) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    shape.insert(shape.begin(), n);
    return scratch.narrow(1, cp.param_base[m], numel).view(shape);
  };
  DenseExperts d{view(kParamUp, {N, H}), view(kParamDown, {H, I}), std::nullopt, std::nullopt};
  if (cp.has[kParamUpBias]) d.up_bias = view(kParamUpBias, {N});
  if (cp.has[kParamDownBias]) d.down_bias = view(kParamDownBias, {H});
  return d;
}

}  // namespace remoe
