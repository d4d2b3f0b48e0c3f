// CPU kernels of the expert-cache simulator: replay routing traces through LRU, LFU and
// Belady/OPT, and LRU stack distances (every LRU cache size in one pass).
//
// Legend: G = independent streams (one per MoE layer for per-layer caches, one for a global
// cache), R = requests per stream (one per token, or per (token, layer) for a global cache),
// K = keys per request (the token's top-k experts), C = cache capacity in slots.
//
// Access model (the semantics of the expert slot pool, pinned down here and in csrc/ops.cpp):
// - A request's K keys are needed at once: all of them are looked up before any is inserted, and
//   the pool pins them, so a request's own keys never evict each other. Hence C >= K.
// - hits[r] counts the request's keys that were resident before the request; every other key is a
//   miss, fetched into a free slot or into the slot of an evicted unpinned key.
// - The keys of a request are then stamped in column (ranking) order, one clock tick each: that
//   order is the recency order among them for LRU and for the LFU/OPT tie-break.
// - LRU evicts the least recently used key. LFU evicts the least frequently used key, counting
//   uses only while resident (a key enters with count 1 and loses its count when evicted), ties ->
//   least recently used. OPT (Belady) evicts the key whose next use is farthest in the future,
//   never-used-again keys first, ties -> least recently used.
// Requests of one stream are replayed in order; streams and capacities are independent, so they
// run in parallel.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace remoe {
namespace {

enum class Policy { kLru, kLfu, kOpt };

// Eviction order: the key with the smallest (first, second) pair is the next victim.
using Priority = std::pair<int64_t, int64_t>;

// A binary min-heap of the resident keys with O(log C) update of any key's priority. Keys are
// small dense integers (layer * E + expert at most), so positions live in a flat array.
class KeyHeap {
 public:
  KeyHeap(int64_t capacity, int64_t num_keys) : pos_(num_keys, -1), prio_(num_keys) {
    heap_.reserve(capacity);
  }

  int64_t size() const { return static_cast<int64_t>(heap_.size()); }
  bool contains(int64_t key) const { return pos_[key] >= 0; }
  int64_t top() const { return heap_[0]; }

  void push(int64_t key, Priority priority) {
    prio_[key] = priority;
    pos_[key] = size();
    heap_.push_back(key);
    sift_up(size() - 1);
  }

  // Only raises or lowers the key's priority; the key must be resident.
  void update(int64_t key, Priority priority) {
    const bool lower = priority < prio_[key];
    prio_[key] = priority;
    if (lower) {
      sift_up(pos_[key]);
    } else {
      sift_down(pos_[key]);
    }
  }

  int64_t pop() {
    const int64_t key = heap_[0];
    const int64_t last = heap_.back();
    heap_.pop_back();
    pos_[key] = -1;
    if (!heap_.empty()) {
      heap_[0] = last;
      pos_[last] = 0;
      sift_down(0);
    }
    return key;
  }

  Priority priority(int64_t key) const { return prio_[key]; }

 private:
  void place(int64_t i, int64_t key) {
    heap_[i] = key;
    pos_[key] = i;
  }
  void sift_up(int64_t i) {
    const int64_t key = heap_[i];
    while (i > 0) {
      const int64_t parent = (i - 1) / 2;
      if (!(prio_[key] < prio_[heap_[parent]])) break;
      place(i, heap_[parent]);
      i = parent;
    }
    place(i, key);
  }
  void sift_down(int64_t i) {
    const int64_t key = heap_[i];
    const int64_t n = size();
    while (true) {
      int64_t child = 2 * i + 1;
      if (child >= n) break;
      if (child + 1 < n && prio_[heap_[child + 1]] < prio_[heap_[child]]) ++child;
      if (!(prio_[heap_[child]] < prio_[key])) break;
      place(i, heap_[child]);
      i = child;
    }
    place(i, key);
  }

  std::vector<int64_t> heap_;     // [<= C] resident keys in heap order
  std::vector<int64_t> pos_;      // [num_keys] index in heap_, -1 when not resident
  std::vector<Priority> prio_;    // [num_keys] eviction priority of resident keys
};

Policy parse_policy(c10::string_view policy) {
  if (policy == "lru") return Policy::kLru;
  if (policy == "lfu") return Policy::kLfu;
  if (policy == "opt") return Policy::kOpt;
  TORCH_CHECK(false, "simulate_cache: policy must be 'lru', 'lfu' or 'opt', got '",
              std::string(policy), "'");
}

void check_requests(const at::Tensor& requests, const char* op) {
  TORCH_CHECK(requests.dim() == 3, op, ": requests must be 3-D [streams, requests, k], got shape ",
              requests.sizes());
  TORCH_CHECK(requests.scalar_type() == at::kInt || requests.scalar_type() == at::kLong, op,
              ": requests must be int32 or int64, got ", requests.scalar_type());
  TORCH_CHECK(requests.device().is_cpu(), op, ": requests must be on the CPU, got ",
              requests.device());
}

// Stack distances are int32 and index flat positions of one stream.
void check_stream_length(const at::Tensor& requests, const char* op) {
  TORCH_CHECK(requests.size(1) * requests.size(2) < std::numeric_limits<int32_t>::max(), op,
              ": at most 2^31 - 1 accesses per stream, got ", requests.size(1) * requests.size(2));
}

// A request's keys are pinned together, so a cache must hold at least K of them.
void check_capacities(const at::Tensor& requests, c10::IntArrayRef capacities, const char* op) {
  const int64_t K = requests.size(2);
  TORCH_CHECK(K >= 1, op, ": requests need at least one key each, got shape ", requests.sizes());
  for (int64_t c : capacities) {
    TORCH_CHECK(c >= K, op, ": every capacity must be >= k = ", K,
                " (a request's keys are pinned together), got ", c);
  }
}

// Checks that every key is >= 0 and that no request repeats a key; returns max key + 1.
template <typename index_t>
int64_t check_keys(const index_t* keys, int64_t G, int64_t R, int64_t K, const char* op) {
  int64_t num_keys = 0;
  for (int64_t i = 0; i < G * R * K; ++i) {
    TORCH_CHECK(keys[i] >= 0, op, ": keys must be >= 0, got ", static_cast<int64_t>(keys[i]),
                " at stream ", i / (R * K), ", request ", (i / K) % R);
    num_keys = std::max<int64_t>(num_keys, static_cast<int64_t>(keys[i]) + 1);
  }
  // Per-key state is a flat array: keys are expert ids (layer * E + expert at most).
  TORCH_CHECK(num_keys <= (int64_t{1} << 30), op, ": keys must be < 2^30, got ", num_keys - 1);
  // stamp[key] = the last request (over all streams) that used the key: O(1) duplicate test.
  std::vector<int64_t> stamp(num_keys, -1);
  for (int64_t row = 0; row < G * R; ++row) {
    for (int64_t j = 0; j < K; ++j) {
      const int64_t key = keys[row * K + j];
      TORCH_CHECK(stamp[key] != row, op, ": request ", row % R, " of stream ", row / R,
                  " lists key ", key, " twice; a token's top-k experts are distinct");
      stamp[key] = row;
    }
  }
  return num_keys;
}

// next[i] = flat position (r * K + j) of the next request using the key of position i in the
// same stream, or int64 max when it is never used again.
template <typename index_t>
void next_uses(const index_t* keys, int64_t n, int64_t num_keys, int64_t* next) {
  std::vector<int64_t> upcoming(num_keys, std::numeric_limits<int64_t>::max());
  for (int64_t i = n - 1; i >= 0; --i) {
    next[i] = upcoming[keys[i]];
    upcoming[keys[i]] = i;
  }
}

// Replays one stream [R, K] through one cache of `capacity` slots; writes hits [R].
template <typename index_t>
void replay(const index_t* keys, const int64_t* next, int64_t R, int64_t K, int64_t num_keys,
            int64_t capacity, Policy policy, int32_t* hits) {
  KeyHeap heap(capacity, num_keys);
  std::vector<int64_t> count(num_keys, 0);       // LFU: uses since the key became resident
  std::vector<int64_t> pinned_by(num_keys, -1);  // request that pins the key
  std::vector<int64_t> set_aside;                // pinned keys popped while finding a victim
  set_aside.reserve(K);
  int64_t clock = 0;

  auto priority = [&](int64_t key, int64_t position) -> Priority {
    switch (policy) {
      case Policy::kLru:
        return {clock, 0};
      case Policy::kLfu:
        return {count[key], clock};
      case Policy::kOpt:
      default:
        // Farthest next use first; never used again (int64 max) comes before any future use.
        return {-next[position], clock};
    }
  };

  for (int64_t r = 0; r < R; ++r) {
    const index_t* request = keys + r * K;
    // Look up and pin the whole request before inserting anything (see the file comment).
    int32_t request_hits = 0;
    for (int64_t j = 0; j < K; ++j) {
      pinned_by[request[j]] = r;
      request_hits += heap.contains(request[j]) ? 1 : 0;
    }
    hits[r] = request_hits;

    for (int64_t j = 0; j < K; ++j) {
      const int64_t key = request[j];
      ++clock;
      if (heap.contains(key)) {
        ++count[key];
        heap.update(key, priority(key, r * K + j));
        continue;
      }
      if (heap.size() == capacity) {
        // At most K - 1 resident keys are pinned and capacity >= K, so a victim exists.
        while (pinned_by[heap.top()] == r) set_aside.push_back(heap.pop());
        count[heap.pop()] = 0;
        for (int64_t kept : set_aside) heap.push(kept, heap.priority(kept));
        set_aside.clear();
      }
      count[key] = 1;
      heap.push(key, priority(key, r * K + j));
    }
  }
}

// requests [G, R, K] int32/int64; capacities: C values, each >= K. Returns hits [C, G, R] int32.
at::Tensor simulate_cache_cpu(const at::Tensor& requests, c10::IntArrayRef capacities,
                              c10::string_view policy_name) {
  check_requests(requests, "simulate_cache");
  const Policy policy = parse_policy(policy_name);
  const int64_t G = requests.size(0);
  const int64_t R = requests.size(1);
  const int64_t K = requests.size(2);
  check_capacities(requests, capacities, "simulate_cache");
  const int64_t num_caps = static_cast<int64_t>(capacities.size());
  const std::vector<int64_t> caps(capacities.begin(), capacities.end());
  const at::Tensor req = requests.contiguous();
  at::Tensor hits = at::zeros({num_caps, G, R}, requests.options().dtype(at::kInt));
  if (G == 0 || R == 0 || num_caps == 0) return hits;

  AT_DISPATCH_INDEX_TYPES(req.scalar_type(), "simulate_cache_cpu", [&] {
    const index_t* keys = req.data_ptr<index_t>();
    const int64_t num_keys = check_keys(keys, G, R, K, "simulate_cache");
    // Next uses only matter to OPT; computed once per stream and shared by every capacity.
    std::vector<int64_t> next(policy == Policy::kOpt ? G * R * K : 0);
    if (policy == Policy::kOpt) {
      at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
        for (int64_t g = begin; g < end; ++g) {
          next_uses(keys + g * R * K, R * K, num_keys, next.data() + g * R * K);
        }
      });
    }
    int32_t* out = hits.data_ptr<int32_t>();
    at::parallel_for(0, num_caps * G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t c = task / G;
        const int64_t g = task % G;
        replay(keys + g * R * K, next.empty() ? nullptr : next.data() + g * R * K, R, K,
               num_keys, caps[c], policy, out + (c * G + g) * R);
      }
    });
  });
  return hits;
}

// LRU stack distances under the access model above: distance[r, j] is 1 + the number of
// distinct keys used after the key's previous use and before request r (keys of request r itself
// do not count: they are looked up together), or 0 for a first use. With C >= K slots the key
// hits iff 1 <= distance <= C, because the cache then always holds the C most recent keys: every
// LRU size from one pass.
//
// Two exact algorithms. Few keys (a per-layer stream: E experts): keep the recency stack itself
// and find each key by a scan from the top; with locality the scan is short and stays in L1.
// Many keys (a global stream: L * E): a Fenwick tree over flat positions marks each key's latest
// use, O(log n) per access whatever the distance.
constexpr int64_t kMaxKeysForStackScan = 256;

template <typename index_t>
void stack_distances_by_scan(const index_t* keys, int64_t R, int64_t K, int64_t num_keys,
                             int32_t* distance) {
  std::vector<int64_t> stack(num_keys);  // recency stack, most recent first: [0, depth)
  int64_t depth = 0;
  auto find = [&](int64_t key) {
    int64_t p = 0;
    while (p < depth && stack[p] != key) ++p;
    return p;  // == depth when absent
  };
  for (int64_t r = 0; r < R; ++r) {
    const index_t* request = keys + r * K;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t p = find(request[j]);
      distance[r * K + j] = p == depth ? 0 : static_cast<int32_t>(p + 1);
    }
    // Move the request's keys to the top in column order, so its last column ends up most
    // recent (the column-order stamps).
    for (int64_t j = 0; j < K; ++j) {
      const int64_t p = find(request[j]);
      if (p == depth) ++depth;
      std::memmove(stack.data() + 1, stack.data(), p * sizeof(int64_t));
      stack[0] = request[j];
    }
  }
}

template <typename index_t>
void stack_distances_by_tree(const index_t* keys, int64_t R, int64_t K, int64_t num_keys,
                             int32_t* distance) {
  const int64_t n = R * K;
  std::vector<int32_t> tree(n + 1, 0);  // Fenwick tree, 1-based: 1 at each key's latest use
  std::vector<int64_t> last(num_keys, -1);
  auto add = [&](int64_t i, int32_t v) {
    for (++i; i <= n; i += i & -i) tree[i] += v;
  };
  auto prefix = [&](int64_t i) {  // sum over positions [0, i)
    int64_t s = 0;
    for (; i > 0; i -= i & -i) s += tree[i];
    return s;
  };
  for (int64_t r = 0; r < R; ++r) {
    const index_t* request = keys + r * K;
    const int64_t start = r * K;
    const int64_t before_request = prefix(start);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t p = last[request[j]];
      distance[start + j] = p < 0 ? 0 : static_cast<int32_t>(before_request - prefix(p + 1) + 1);
    }
    for (int64_t j = 0; j < K; ++j) {
      const int64_t key = request[j];
      if (last[key] >= 0) add(last[key], -1);
      add(start + j, 1);
      last[key] = start + j;
    }
  }
}

template <typename index_t>
void stack_distances(const index_t* keys, int64_t R, int64_t K, int64_t num_keys,
                     int32_t* distance) {
  if (num_keys <= kMaxKeysForStackScan) {
    stack_distances_by_scan(keys, R, K, num_keys, distance);
  } else {
    stack_distances_by_tree(keys, R, K, num_keys, distance);
  }
}

// requests [G, R, K] int32/int64 -> distances [G, R, K] int32.
at::Tensor lru_stack_distances_cpu(const at::Tensor& requests) {
  check_requests(requests, "lru_stack_distances");
  check_stream_length(requests, "lru_stack_distances");
  const int64_t G = requests.size(0);
  const int64_t R = requests.size(1);
  const int64_t K = requests.size(2);
  const at::Tensor req = requests.contiguous();
  at::Tensor distance = at::empty({G, R, K}, requests.options().dtype(at::kInt));
  if (G == 0 || R == 0 || K == 0) return distance;
  AT_DISPATCH_INDEX_TYPES(req.scalar_type(), "lru_stack_distances_cpu", [&] {
    const index_t* keys = req.data_ptr<index_t>();
    const int64_t num_keys = check_keys(keys, G, R, K, "lru_stack_distances");
    int32_t* out = distance.data_ptr<int32_t>();
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        stack_distances(keys + g * R * K, R, K, num_keys, out + g * R * K);
      }
    });
  });
  return distance;
}

// LRU hits at every capacity from one stack-distance pass per stream: the same result as
// simulate_cache(requests, capacities, "lru"). requests [G, R, K] -> hits [C, G, R] int32.
at::Tensor lru_sweep_cpu(const at::Tensor& requests, c10::IntArrayRef capacities) {
  check_requests(requests, "lru_sweep");
  check_stream_length(requests, "lru_sweep");
  const int64_t G = requests.size(0);
  const int64_t R = requests.size(1);
  const int64_t K = requests.size(2);
  check_capacities(requests, capacities, "lru_sweep");
  const int64_t num_caps = static_cast<int64_t>(capacities.size());
  const std::vector<int64_t> caps(capacities.begin(), capacities.end());
  const at::Tensor req = requests.contiguous();
  at::Tensor hits = at::zeros({num_caps, G, R}, requests.options().dtype(at::kInt));
  if (G == 0 || R == 0 || num_caps == 0) return hits;
  AT_DISPATCH_INDEX_TYPES(req.scalar_type(), "lru_sweep_cpu", [&] {
    const index_t* keys = req.data_ptr<index_t>();
    const int64_t num_keys = check_keys(keys, G, R, K, "lru_sweep");
    int32_t* out = hits.data_ptr<int32_t>();
    at::parallel_for(0, G, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> distance(R * K);
      for (int64_t g = begin; g < end; ++g) {
        stack_distances(keys + g * R * K, R, K, num_keys, distance.data());
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t c = 0; c < num_caps; ++c) {
            int32_t h = 0;
            for (int64_t j = 0; j < K; ++j) {
              const int32_t d = distance[r * K + j];
              h += (d >= 1 && d <= caps[c]) ? 1 : 0;
            }
            out[(c * G + g) * R + r] = h;
          }
        }
      }
    });
  });
  return hits;
}

}  // namespace

TORCH_LIBRARY_IMPL(remoe, CPU, m) {
  m.impl("simulate_cache", &simulate_cache_cpu);
  m.impl("lru_stack_distances", &lru_stack_distances_cpu);
  m.impl("lru_sweep", &lru_sweep_cpu);
}

}  // namespace remoe
