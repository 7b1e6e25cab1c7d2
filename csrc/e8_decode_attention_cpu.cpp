// Native CPU paged decode attention over E8-packed pages: one query token per request attends to its cached context
// (codes decoded in registers, never written back) and to its own raw K/V. Same math as the torch path
// (nexusquant_vllm/vllm_glue/paged_attention.py: scores in the codec's rotated domain, float32, -inf for vLLM's null
// block), one online softmax per query head. Plain C ABI, called through ctypes (nexusquant_vllm/native/).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int kGroup = 8;
constexpr int kMaxDim = 512;
constexpr int kMaxGqa = 16;

struct Codebooks {
  const float* e8p;   // all 2^16 E8P points [65536, 8] (a 2 MiB table: one aligned 32-byte load per group)
  const float* res8;  // RES8 points [256, 8]
};

uint32_t read_u16(const uint8_t* p) { return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8); }

// Decodes `d` elements coded at `bits` from planar codes (stage-major, see codec/packing.py), times `scale`.
void decode_vector(const Codebooks& cb, const uint8_t* codes, int d, int bits, float scale, float* out) {
  const int groups = d / kGroup;
  const uint8_t* second = codes + 2 * groups;
  for (int g = 0; g < groups; ++g) {
    const float* first = cb.e8p + read_u16(codes + 2 * g) * kGroup;
    float* o = out + g * kGroup;
    if (bits == 3) {
      const float* point = cb.res8 + second[g] * kGroup;
      for (int i = 0; i < kGroup; ++i) o[i] = (first[i] + point[i] * 0.5f) * scale;
    } else if (bits == 4) {
      const float* point = cb.e8p + read_u16(second + 2 * g) * kGroup;
      for (int i = 0; i < kGroup; ++i) o[i] = (first[i] + point[i] * 0.25f) * scale;
    } else {
      for (int i = 0; i < kGroup; ++i) o[i] = first[i] * scale;
    }
  }
}

float read_fp16(const uint8_t* p) {
  _Float16 h;
  std::memcpy(&h, p, sizeof(h));
  return static_cast<float>(h);
}

constexpr int kMaxBlock = 256;

// Dot product with 8 independent partial sums, so the compiler vectorizes it without reassociating floats itself.
float dot(const float* a, const float* b, int d) {
  float lanes[kGroup] = {};
  for (int i = 0; i < d; i += kGroup) {
    for (int l = 0; l < kGroup; ++l) lanes[l] += a[i + l] * b[i + l];
  }
  float total = 0.0f;
  for (int l = 0; l < kGroup; ++l) total += lanes[l];
  return total;
}

// Online softmax over blocks of keys: per query head the running max, the running sum and the P·V accumulator.
struct Accumulator {
  float max[kMaxGqa];
  float sum[kMaxGqa];
  float acc[kMaxGqa][kMaxDim];
  float k[kMaxBlock][kMaxDim];  // one block of decoded, scaled keys
  float v[kMaxBlock][kMaxDim];  // and values
  float p[kMaxGqa][kMaxBlock];  // scores, then probabilities
};

// The hot loop gets an AVX2+FMA clone, chosen at load time on CPUs that have it (-march stays portable).
#define NQ_HOT __attribute__((target_clones("arch=haswell", "default")))

// Folds n keys/values (already in st.k / st.v) into the accumulator of the gqa query heads q [gqa, d].
NQ_HOT void fold_block(Accumulator& st, const float* q, int gqa, int d, int n) {
  for (int j = 0; j < gqa; ++j) {
    float m = st.max[j];
    for (int t = 0; t < n; ++t) {
      st.p[j][t] = dot(q + j * d, st.k[t], d);
      m = st.p[j][t] > m ? st.p[j][t] : m;
    }
    const float correction = std::exp(st.max[j] - m);  // exp(-inf) = 0 on the first block
    float sum = 0.0f;
    for (int t = 0; t < n; ++t) {
      st.p[j][t] = std::exp(st.p[j][t] - m);
      sum += st.p[j][t];
    }
    st.sum[j] = st.sum[j] * correction + sum;
    st.max[j] = m;
    float* acc = st.acc[j];
    for (int i = 0; i < d; ++i) acc[i] *= correction;
    for (int t = 0; t < n; ++t) {
      const float pt = st.p[j][t];
      for (int i = 0; i < d; ++i) acc[i] += pt * st.v[t][i];
    }
  }
}

}  // namespace

extern "C" {

// Rows [pair_begin, pair_end) of the (request, kv head) pairs. q: [R, Hk*gqa, d] rotated queries, pre-multiplied by
// the softmax scale; k_new/v_new: [R, Hk, d] rotated raw K/V of the current token; cache: uint8 pages with byte
// strides (block, head, token); block_table: int64 [R, table_width]; cached: int64 [R] cached tokens;
// out: [R, Hk*gqa, d] float32. Slot layout: [K codes | V codes | K scale fp16 | V scale fp16].
void nq_e8_decode_attention(const float* q, const float* k_new, const float* v_new, const uint8_t* cache,
                            int64_t block_stride, int64_t head_stride, int64_t token_stride, int block_size,
                            const int64_t* block_table, int64_t table_width, const int64_t* cached, int64_t num_kv_heads,
                            int gqa, int d, int k_bits, int v_bits, const float* e8p, const float* res8,
                            int64_t pair_begin, int64_t pair_end, float* out) {
  const Codebooks cb{e8p, res8};
  const int k_bytes = d / kGroup * k_bits, v_bytes = d / kGroup * v_bits;
  static thread_local Accumulator st;
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    const int64_t r = pair / num_kv_heads, h = pair % num_kv_heads;
    const float* qh = q + (r * num_kv_heads + h) * gqa * d;
    for (int j = 0; j < gqa; ++j) {
      st.max[j] = -std::numeric_limits<float>::infinity();
      st.sum[j] = 0.0f;
      std::memset(st.acc[j], 0, sizeof(float) * d);
    }
    const int64_t len = cached[r];
    for (int64_t start = 0; start < len; start += block_size) {
      const int64_t block = block_table[r * table_width + start / block_size];
      if (block == 0) continue;  // vLLM's null block: an evicted hole, masked (never read)
      const int n = static_cast<int>(len - start < block_size ? len - start : block_size);
      const uint8_t* base = cache + block * block_stride + h * head_stride;
      for (int t = 0; t < n; ++t) {
        const uint8_t* slot = base + t * token_stride;
        const float k_scale = read_fp16(slot + k_bytes + v_bytes), v_scale = read_fp16(slot + k_bytes + v_bytes + 2);
        decode_vector(cb, slot, d, k_bits, k_scale, st.k[t]);
        decode_vector(cb, slot + k_bytes, d, v_bits, v_scale, st.v[t]);
      }
      fold_block(st, qh, gqa, d, n);
    }
    std::memcpy(st.k[0], k_new + (r * num_kv_heads + h) * d, sizeof(float) * d);  // the current token, raw
    std::memcpy(st.v[0], v_new + (r * num_kv_heads + h) * d, sizeof(float) * d);
    fold_block(st, qh, gqa, d, 1);
    float* oh = out + (r * num_kv_heads + h) * gqa * d;
    for (int j = 0; j < gqa; ++j) {
      for (int i = 0; i < d; ++i) oh[j * d + i] = st.acc[j][i] / st.sum[j];
    }
  }
}

}  // extern "C"
