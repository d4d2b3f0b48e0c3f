// The one schema file of remoe_engine._C: every op the extension registers is declared here, with
// its contract in one comment. Kernels live in per-area folders and register themselves with
// TORCH_LIBRARY_IMPL(remoe, CPU|CUDA, m), so a CPU-only build simply leaves the .cu files out.

#include <Python.h>
#include <torch/library.h>

#include "pool/slot_pool.h"
#include "transfer/crc32c.h"
#include "transfer/host_memory.h"

// Python imports `remoe_engine._C` only to load this library and run the registrations below;
// the module has no attributes of its own (ops are reached through torch.ops.remoe).
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "remoe-engine compiled ops (see torch.ops.remoe)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(remoe, m) {
  // Fused router top-k. logits [T, E] (fp32/bf16/fp16) -> (weights [T, K] fp32, ids [T, K] int64).
  // scoring: "softmax" | "sigmoid" | "softmax_over_topk" (GPT-OSS: top-k on logits, softmax over the
  // chosen k). Scores are computed in fp32. The selection score is score + correction_bias[e]
  // + reuse_bias * prefer[t?, e]; weights always come from the unbiased score. Group-limited
  // selection keeps the topk_group best of n_group equal groups, ranked by group_score "max"
  // (DeepSeek-V2) or "top2_sum" (DeepSeek-V3). Ranking: larger first, ties -> lower expert id,
  // NaN ranks below every number (NaN weights then show a broken row instead of hiding it).
  // ids are sorted by selection score. renormalize divides by the sum of the chosen weights
  // (ignored for softmax_over_topk, already normalized); then weights *= routed_scaling.
  m.def(
      "route_topk(Tensor logits, int top_k, str scoring, bool renormalize, Tensor? prefer, "
      "float reuse_bias, Tensor? correction_bias, int n_group, int topk_group, str group_score, "
      "float routed_scaling) -> (Tensor weights, Tensor ids)");
  // Expert-cache replay (csrc/sim). requests [G, R, K] int32/int64 keys: G independent streams
  // of R requests, each needing its K distinct keys resident at once (pinned together, so every
  // capacity must be >= K). Returns hits [len(capacities), G, R] int32: keys of each request
  // already resident. policy: "lru" | "lfu" (uses counted while resident, ties -> LRU) | "opt"
  // (Belady: farthest next use, ties -> LRU). A request's keys are stamped in column order.
  m.def("simulate_cache(Tensor requests, int[] capacities, str policy) -> Tensor hits");
  // LRU stack distances under the same access model: requests [G, R, K] -> [G, R, K] int32,
  // 1 + distinct keys used since the key's previous use (before this request), 0 on first use.
  // With C >= K slots a key hits iff 1 <= distance <= C: every LRU size in one pass.
  m.def("lru_stack_distances(Tensor requests) -> Tensor distances");
  // LRU at every capacity from one stack-distance pass per stream: hits [len(capacities), G, R]
  // int32, equal to simulate_cache(requests, capacities, "lru").
  m.def("lru_sweep(Tensor requests, int[] capacities) -> Tensor hits");

  // CRC32C (Castagnoli) of a contiguous CPU uint8 tensor, continuing `crc` (the CRC of earlier
  // bytes): crc32c(b, crc32c(a)) == crc32c(a ++ b). The packed expert format's checksum; the pool
  // verifies the same function in its reader threads (csrc/transfer/crc32c.h). Host-only.
  m.def("crc32c(Tensor data, int crc=0) -> int");
  // Which CRC32C implementation this CPU runs: "sse4.2", "armv8-crc" or "table".
  m.def("crc32c_impl() -> str", [] { return std::string(remoe::crc32c_impl()); });

  // One MoE layer's experts over the pool's slots (csrc/experts): out[t] = sum_k route_weights[t, k]
  // * FFN_{slots[t, k]}(hidden[t]), returned fp32 [T, H] whatever the weights' dtype (the caller
  // rounds once). hidden [T, H]; slots int64 [T, K], -1 = no expert (a pair another wave or
  // another rank computes); up [S, N, H] and down [S, H, I] ([S, H, N] and [S, I, H] when
  // transposed), each slot a dense matrix in hidden's dtype, any slot stride (the pool buffer's
  // views); biases [S, N] and [S, H]. FFN(x) = down(gate(up(x) + up_bias)) + down_bias, where
  // gate maps the N up outputs to I: "none" act(u) (N = I), "chunk" (gate rows [0, I), up rows
  // [I, 2I)) or "interleave" (even rows gate, odd rows up) act(g) * (u + up_offset), with
  // activation silu | gelu | gelu_tanh | relu | relu2 | swish_alpha (x * sigmoid(alpha x)), and
  // clamp "input" (g = min(g, limit) before act) or "output" (min(act(g), limit) after it), both
  // also clamping u to [-limit, limit]. Accumulation is fp32; pairs sum in a fixed order.
  m.def(
      "moe_experts(Tensor hidden, Tensor slots, Tensor route_weights, Tensor up, Tensor? up_bias, "
      "Tensor down, Tensor? down_bias, str gate, str activation, str clamp, float limit, "
      "float alpha, float up_offset, bool transposed) -> Tensor");

  // torch.classes.remoe.SlotPool: the expert slot pool (csrc/pool/slot_pool.h; facade and policy
  // specification in remoe_engine/pool.py).
  remoe::register_slot_pool(m);

  // route_topk with the "previous" reuse bias over whole sequences, in one call: logits
  // [B, S, E]; position s of sequence b prefers (reuse_bias) the K experts position s-1 chose,
  // position 0 those in previous [B, K] (none when previous is None). Each row is exactly
  // route_topk's row with that prefer mask. Returns weights [B, S, K] fp32, ids [B, S, K] int64.
  // No autograd: the router recomputes differentiable weights with route_topk when it must.
  m.def(
      "route_topk_previous(Tensor logits, Tensor? previous, int top_k, str scoring, "
      "bool renormalize, float reuse_bias, Tensor? correction_bias, int n_group, int topk_group, "
      "str group_score, float routed_scaling) -> (Tensor weights, Tensor ids)");
  // uint8 [rows, cols] CPU tensor of page-locked memory of exactly rows * cols bytes (page-
  // rounded), registered with the driver in chunk_bytes pieces and unregistered when freed;
  // torch's pin_memory rounds to a power of two. Raises in a build without CUDA.
  m.def("pinned_host_empty(int rows, int cols, int chunk_bytes) -> Tensor",
        &remoe::pinned_host_empty);
  // Bytes currently page-locked by pinned_host_empty (page-rounded per tensor).
  m.def("pinned_host_bytes() -> int", &remoe::pinned_host_bytes);
  // Dequantize one compressed expert blob (csrc/quant/dequant.h): blob uint8 [n] on the CPU or a
  // GPU, plan int64 [N, 12] on the CPU (remoe_engine/quant.py, QuantLayout.plan) -> uint8
  // [out_bytes] on the blob's device, zero where no part writes, each part's elements in `dtype`
  // (float32 | bfloat16 | float16). The reader threads and the CUDA copy engine run the same
  // arithmetic on every load of a compressed store; a non-finite scale is an error.
  m.def("dequantize(Tensor blob, Tensor plan, ScalarType dtype, int out_bytes) -> Tensor");
  // moe_experts over slots holding compressed expert blobs (csrc/experts/
  // moe_experts_compressed_cpu.cpp): blobs uint8 [S, B] (the pool's slot buffer), plan int64
  // [n, 11] on the CPU (remoe_engine/quant.py, QuantLayout.compute_plan: per part the matrix it
  // fills, 0 up [N, H], 1 up_bias [1, N], 2 down [H, I], 3 down_bias [1, H], its first row, and
  // its codes and scales as in dequantize's plan), up_rows = N. The codes are decoded as they are
  // read; gate, activation, clamp, limit, alpha and up_offset as for moe_experts. fp32 [T, H].
  m.def(
      "moe_experts_compressed(Tensor hidden, Tensor slots, Tensor route_weights, Tensor blobs, "
      "Tensor plan, int up_rows, str gate, str activation, str clamp, float limit, float alpha, "
      "float up_offset) -> Tensor");
}
