#include <cmath>

#include "cuda_ops.cuh"

namespace pearl::gpu {

namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 8;  // query heads per KV head
constexpr int kVec = 8;       // bf16 values per 16-byte load
constexpr int kMaxPrefetch = 8;  // 16-byte K or V loads a thread keeps in flight (registers bound it)
static_assert(kAttentionSplit <= kThreads, "one thread looks up each key of a split");

__device__ __forceinline__ void unpack_bf16x8(const uint4& raw, float (&out)[kVec]) {
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = __bfloat1622float2(pairs[i]);
    out[2 * i] = pair.x;
    out[2 * i + 1] = pair.y;
  }
}

__device__ __forceinline__ int64_t kv_slot(const int32_t* table, int block_size, int position) {
  return static_cast<int64_t>(table[position / block_size]) * block_size + position % block_size;
}

// Issues the 16-byte loads of keys first_key, first_key + kStride, ... (kCount of them) before any is used,
// so their latencies overlap; keys at or past `keys` load nothing.
template <int kCount, int kStride>
__device__ __forceinline__ void load_key_slices(const bf16* base, const int64_t* key_offsets, int first_key, int keys,
                                                uint4 (&raw)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) {
    const int key = first_key + i * kStride;
    raw[i] = key < keys ? *reinterpret_cast<const uint4*>(base + key_offsets[key]) : make_uint4(0, 0, 0, 0);
  }
}

// One CTA per (row, KV head, slot): all query heads of the KV head share each K/V load (GQA packing).
// The CTA runs an online softmax over the splits slot, slot + kAttentionSlots, ... of the row's context
// (in that order) and leaves an unnormalized partial state (acc, max, sum) in base-2 exponent units.
// Thread t works on key t / kLanesPerKey (+ multiples of kKeyGroups), slice t % kLanesPerKey, in both the
// score and the value phase. Short contexts make this kernel latency-bound, so each split looks up its
// block table once and every thread issues all its K and V loads of a split (kMaxPrefetch at a time)
// before the first use; the arithmetic and its order per output are those of a plain key loop. kGroup is the
// model's query heads per KV head rounded up to a power of two: every head loop is unrolled over it, so a
// Llama (4) does not pay for the largest grouping's registers, products and shuffles.
template <int kHeadDim, int kGroup>
__global__ void __launch_bounds__(kThreads) attention_split_kernel(const float* __restrict__ q, int64_t q_stride,
                                                                  int num_heads, DeviceKvLayer kv, DeviceRows batch,
                                                                  int sliding_window, float scale_log2,
                                                                  float* __restrict__ partial_acc,
                                                                  float* __restrict__ partial_state) {
  constexpr int kLanesPerKey = kHeadDim / kVec;  // lanes that share one key row in the score phase
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kKeyGroups = kThreads / kLanesPerKey;  // keys per score pass, key interleave of the value phase
  constexpr int kSteps = kAttentionSplit / kKeyGroups;  // score passes (and value steps) per split
  constexpr int kPrefetch = kSteps < kMaxPrefetch ? kSteps : kMaxPrefetch;
  static_assert(kWarps * kKeysPerWarp == kKeyGroups && kSteps % kPrefetch == 0, "split layout");
  __shared__ int64_t key_offsets[kAttentionSplit];  // element offset of each key's K/V row in this split
  __shared__ float scores[kGroup][kAttentionSplit];
  __shared__ float alpha[kGroup];
  __shared__ float running_max[kGroup];
  __shared__ float running_sum[kGroup];
  __shared__ float reduce[kKeyGroups][kGroup][kHeadDim];

  allow_dependent_launch();
  const int row = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int slot = blockIdx.z;
  const int group = num_heads / kv.num_kv_heads;
  const int first_head = kv_head * group;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int position = batch.positions[row];
  const int start = position >= 0 && sliding_window > 0 ? max(0, position - sliding_window + 1) : 0;
  const int count = position >= 0 ? position - start + 1 : 0;
  const int num_splits = (count + kAttentionSplit - 1) / kAttentionSplit;
  const int64_t state_row = static_cast<int64_t>(row) * num_heads + first_head;
  const int32_t* table = batch.block_tables + static_cast<int64_t>(batch.row_table[row]) * *batch.table_stride;
  const int64_t kv_row_width = static_cast<int64_t>(kv.num_kv_heads) * kHeadDim;
  // A split's keys: the element offset of each key's K/V row, from the block table.
  const auto split_keys = [&](int split) { return min(kAttentionSplit, count - split * kAttentionSplit); };
  const auto stage_key_offsets = [&](int split) {
    const int first = start + split * kAttentionSplit;
    if (static_cast<int>(threadIdx.x) < split_keys(split)) {
      key_offsets[threadIdx.x] = kv_slot(table, kv.block_size, first + threadIdx.x) * kv_row_width;
    }
  };
  // Block tables are written before the step; q and the newest K/V by the kernel before this one.
  if (slot < num_splits) stage_key_offsets(slot);
  wait_for_prerequisites();

  if (slot >= num_splits) {
    if (threadIdx.x < group) {
      float* state = partial_state + ((state_row + threadIdx.x) * kAttentionSlots + slot) * 2;
      state[0] = -INFINITY;
      state[1] = 0.0f;
    }
    return;
  }
  if (threadIdx.x < kGroup) {
    running_max[threadIdx.x] = -INFINITY;
    running_sum[threadIdx.x] = 0.0f;
  }

  const int chunk = threadIdx.x % kLanesPerKey;
  const int key_group = threadIdx.x / kLanesPerKey;
  float q_regs[kGroup][kVec];
#pragma unroll
  for (int h = 0; h < kGroup; ++h) {
    if (h < group) {
      const float4* q_head = reinterpret_cast<const float4*>(q + row * q_stride +
                                                             static_cast<int64_t>(first_head + h) * kHeadDim +
                                                             chunk * kVec);
      const float4 low = q_head[0];
      const float4 high = q_head[1];
      const float values[kVec] = {low.x, low.y, low.z, low.w, high.x, high.y, high.z, high.w};
#pragma unroll
      for (int j = 0; j < kVec; ++j) q_regs[h][j] = values[j] * scale_log2;
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) q_regs[h][j] = 0.0f;
    }
  }

  float acc[kGroup][kVec];
#pragma unroll
  for (int h = 0; h < kGroup; ++h) {
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[h][j] = 0.0f;
  }

  const bf16* k_base = kv.k + kv_head * kHeadDim + chunk * kVec;
  const bf16* v_base = kv.v + kv_head * kHeadDim + chunk * kVec;

  for (int split = slot; split < num_splits; split += kAttentionSlots) {
    const int keys = split_keys(split);

    // The barrier also publishes the running state set above, before the first split.
    if (split != slot) stage_key_offsets(split);
    __syncthreads();

    uint4 k_raw[kPrefetch];
    uint4 v_raw[kPrefetch];
    load_key_slices<kPrefetch, kKeyGroups>(k_base, key_offsets, key_group, keys, k_raw);
    load_key_slices<kPrefetch, kKeyGroups>(v_base, key_offsets, key_group, keys, v_raw);

    // Scores: kLanesPerKey lanes per key, each a 16-byte slice of K, combined by shuffles.
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      if (step > 0 && step % kPrefetch == 0) {
        load_key_slices<kPrefetch, kKeyGroups>(k_base, key_offsets, key_group + step * kKeyGroups, keys, k_raw);
      }
      if ((step * kWarps + warp) * kKeysPerWarp >= keys) continue;  // the warp has no key in this pass
      const int key = key_group + step * kKeyGroups;
      float s[kGroup];
#pragma unroll
      for (int h = 0; h < kGroup; ++h) s[h] = 0.0f;
      if (key < keys) {
        float k_values[kVec];
        unpack_bf16x8(k_raw[step % kPrefetch], k_values);
#pragma unroll
        for (int h = 0; h < kGroup; ++h) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) s[h] += q_regs[h][j] * k_values[j];
        }
      }
#pragma unroll
      for (int h = 0; h < kGroup; ++h) {
#pragma unroll
        for (int offset = kLanesPerKey / 2; offset > 0; offset /= 2) {
          s[h] += __shfl_xor_sync(0xffffffffu, s[h], offset);
        }
      }
      if (chunk == 0 && key < keys) {
#pragma unroll
        for (int h = 0; h < kGroup; ++h) {
          if (h < group) scores[h][key] = s[h];
        }
      }
    }
    __syncthreads();

    // Softmax update, one warp per head: new running max, probabilities, rescale factor.
    for (int h = warp; h < group; h += kWarps) {
      float split_max = -INFINITY;
      for (int key = lane; key < keys; key += 32) split_max = fmaxf(split_max, scores[h][key]);
      split_max = warp_max(split_max);
      const float old_max = running_max[h];
      const float new_max = fmaxf(old_max, split_max);
      float sum = 0.0f;
      for (int key = lane; key < keys; key += 32) {
        const float p = exp2f(scores[h][key] - new_max);
        scores[h][key] = p;
        sum += p;
      }
      sum = warp_sum(sum);
      __syncwarp();  // every lane has read running_max[h] before lane 0 replaces it
      if (lane == 0) {
        const float rescale = exp2f(old_max - new_max);
        alpha[h] = rescale;
        running_sum[h] = running_sum[h] * rescale + sum;
        running_max[h] = new_max;
      }
    }
    __syncthreads();

    // Values: each thread owns one 16-byte slice of the head for the keys of its key group.
#pragma unroll
    for (int h = 0; h < kGroup; ++h) {
      if (h < group) {
        const float rescale = alpha[h];
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[h][j] *= rescale;
      }
    }
#pragma unroll
    for (int step = 0; step < kSteps; ++step) {
      if (step > 0 && step % kPrefetch == 0) {
        load_key_slices<kPrefetch, kKeyGroups>(v_base, key_offsets, key_group + step * kKeyGroups, keys, v_raw);
      }
      const int key = key_group + step * kKeyGroups;
      if (key >= keys) break;
      float v_values[kVec];
      unpack_bf16x8(v_raw[step % kPrefetch], v_values);
#pragma unroll
      for (int h = 0; h < kGroup; ++h) {
        if (h < group) {
          const float p = scores[h][key];
#pragma unroll
          for (int j = 0; j < kVec; ++j) acc[h][j] += p * v_values[j];
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int h = 0; h < kGroup; ++h) {
    if (h < group) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) reduce[key_group][h][chunk * kVec + j] = acc[h][j];
    }
  }
  __syncthreads();
  for (int index = threadIdx.x; index < group * kHeadDim; index += kThreads) {
    const int h = index / kHeadDim;
    const int d = index % kHeadDim;
    float sum = 0.0f;
    for (int kg = 0; kg < kKeyGroups; ++kg) sum += reduce[kg][h][d];
    partial_acc[((state_row + h) * kAttentionSlots + slot) * kHeadDim + d] = sum;
  }
  if (threadIdx.x < group) {
    float* state = partial_state + ((state_row + threadIdx.x) * kAttentionSlots + slot) * 2;
    state[0] = running_max[threadIdx.x];
    state[1] = running_sum[threadIdx.x];
  }
}

// Log-sum-exp merge of a (row, head)'s slots in slot order; a padding row (no keys) gets zeros.
__global__ void attention_merge_kernel(const float* __restrict__ partial_acc, const float* __restrict__ partial_state,
                                       int num_heads, int head_dim, bf16* __restrict__ out) {
  allow_dependent_launch();
  wait_for_prerequisites();
  const int row = blockIdx.x;
  const int head = blockIdx.y;
  const int d = threadIdx.x;
  const int64_t base = (static_cast<int64_t>(row) * num_heads + head) * kAttentionSlots;
  // Every slot's state and share are loaded before the first is used: one memory round trip, not two.
  float2 states[kAttentionSlots];
  float accs[kAttentionSlots];
#pragma unroll
  for (int s = 0; s < kAttentionSlots; ++s) {
    states[s] = reinterpret_cast<const float2*>(partial_state)[base + s];
    accs[s] = partial_acc[(base + s) * head_dim + d];
  }
  float max_all = -INFINITY;
#pragma unroll
  for (int s = 0; s < kAttentionSlots; ++s) max_all = fmaxf(max_all, states[s].x);
  float value = 0.0f;
  if (max_all != -INFINITY) {
    float sum = 0.0f;
    float weighted = 0.0f;
#pragma unroll
    for (int s = 0; s < kAttentionSlots; ++s) {
      if (states[s].x == -INFINITY) continue;  // a slot past the context: its share was never written
      const float weight = exp2f(states[s].x - max_all);
      sum += states[s].y * weight;
      weighted += accs[s] * weight;
    }
    value = weighted / sum;
  }
  out[(static_cast<int64_t>(row) * num_heads + head) * head_dim + d] = __float2bfloat16(value);
}

template <int kHeadDim, int kGroup>
void launch_split_group(const float* q, int64_t q_stride, int rows, int num_heads, const DeviceKvLayer& kv,
                        const DeviceRows& batch, int sliding_window, float scale_log2, float* partial_acc,
                        float* partial_state, bool programmatic, cudaStream_t stream) {
  const dim3 grid(rows, kv.num_kv_heads, kAttentionSlots);
  launch_kernel(attention_split_kernel<kHeadDim, kGroup>, grid, dim3(kThreads), 0, programmatic, stream, q, q_stride,
                num_heads, kv, batch, sliding_window, scale_log2, partial_acc, partial_state);
}

// The kernel for the smallest power of two of query heads per KV head that holds the model's.
template <int kHeadDim>
void launch_split(const float* q, int64_t q_stride, int rows, int num_heads, const DeviceKvLayer& kv,
                  const DeviceRows& batch, int sliding_window, float scale_log2, float* partial_acc,
                  float* partial_state, bool programmatic, cudaStream_t stream) {
  const int group = num_heads / kv.num_kv_heads;
  const auto launch = group <= 1   ? launch_split_group<kHeadDim, 1>
                      : group <= 2 ? launch_split_group<kHeadDim, 2>
                      : group <= 4 ? launch_split_group<kHeadDim, 4>
                                   : launch_split_group<kHeadDim, 8>;
  launch(q, q_stride, rows, num_heads, kv, batch, sliding_window, scale_log2, partial_acc, partial_state, programmatic,
         stream);
}

}  // namespace

bool attention_supports(int head_dim, int group) {
  const bool known_head_dim = head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
  return known_head_dim && group >= 1 && group <= kMaxGroup;
}

size_t attention_scratch_floats(int rows, int num_heads, int head_dim) {
  return static_cast<size_t>(rows) * num_heads * kAttentionSlots * (head_dim + 2);
}

void attention(const float* q, int64_t q_stride, int rows, int num_heads, const DeviceKvLayer& kv,
               const DeviceRows& batch, int sliding_window, float* scratch, bf16* out, bool programmatic,
               cudaStream_t stream) {
  if (rows == 0) return;
  const int head_dim = kv.head_dim;
  if (!attention_supports(head_dim, num_heads / kv.num_kv_heads)) {
    throw std::logic_error("attention: unsupported head_dim " + std::to_string(head_dim) + " or grouping");
  }
  if (reinterpret_cast<uintptr_t>(q) % 16 != 0 || q_stride % 4 != 0) {
    throw std::logic_error("attention: q rows must be 16-byte aligned (q_stride " + std::to_string(q_stride) + ")");
  }
  float* partial_acc = scratch;
  float* partial_state = scratch + static_cast<size_t>(rows) * num_heads * kAttentionSlots * head_dim;
  const float scale_log2 = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)) * 1.4426950408889634);
  switch (head_dim) {
    case 16:
      launch_split<16>(q, q_stride, rows, num_heads, kv, batch, sliding_window, scale_log2, partial_acc, partial_state,
                       programmatic, stream);
      break;
    case 32:
      launch_split<32>(q, q_stride, rows, num_heads, kv, batch, sliding_window, scale_log2, partial_acc, partial_state,
                       programmatic, stream);
      break;
    case 64:
      launch_split<64>(q, q_stride, rows, num_heads, kv, batch, sliding_window, scale_log2, partial_acc, partial_state,
                       programmatic, stream);
      break;
    case 128:
      launch_split<128>(q, q_stride, rows, num_heads, kv, batch, sliding_window, scale_log2, partial_acc,
                        partial_state, programmatic, stream);
      break;
    default:
      launch_split<256>(q, q_stride, rows, num_heads, kv, batch, sliding_window, scale_log2, partial_acc,
                        partial_state, programmatic, stream);
      break;
  }
  check_launch("attention_split");
  launch_kernel(attention_merge_kernel, dim3(rows, num_heads), dim3(head_dim), 0, programmatic, stream, partial_acc,
                partial_state, num_heads, head_dim, out);
  check_launch("attention_merge");
}

}  // namespace pearl::gpu
