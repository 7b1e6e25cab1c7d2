// Native CPU paged decode attention: one query token per request attends to its cached context and to its own raw
// K/V. Two page kinds share one kernel:
//   * E8 pages (uint8 slots [K codes | V codes | K scale fp16 | V scale fp16]): codes are decoded chunk by chunk into
//     an L1-sized buffer (E8P from its 256-pattern table plus sign bits, RES8 / second E8P stage), never written back;
//     the fp16 scales are folded into the scores and into P·V.
//   * dense pages of the protected boundary layers (one token-head's [K | V] row in bf16, fp16 or fp32).
// Same math as the torch path (nexusquant_vllm/vllm_glue/paged_attention.py: float32, scores in the pages' domain,
// vLLM's null block skipped), one online softmax per query head; all heads of a GQA group share each decoded K/V.
// Plain C ABI, called through ctypes (nexusquant_vllm/native/paged_decode.py).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "e8p.h"
#include "hadamard.h"
#include "parallel.h"
#include "simd.h"

namespace {

constexpr int kGroup = 8;
constexpr int kMaxDim = 512;
constexpr int kMaxGqa = 16;
constexpr int kChunk = 32;  // tokens per online-softmax step: their decoded K and V (16 KiB at d = 64) stay in L1

using nq::load8;
using nq::store8;
using nq::v8f;
using nq::v8i;
using nq::v8i_unaligned;

// The pair loop gets an x86-64-v3 clone (AVX2, FMA), chosen at load time by the CPU's ISA level (not by CPU model,
// so AMD CPUs get it too); setup.py lets this file fuse multiply-adds.
#define NQ_HOT __attribute__((target_clones("arch=x86-64-v3", "default")))

NQ_INLINE float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

NQ_INLINE float dot(const float* a, const float* b, int d) {
  v8f even = {}, odd = {};
  int i = 0;
  for (; i + 2 * kGroup <= d; i += 2 * kGroup) {
    even += load8(a + i) * load8(b + i);
    odd += load8(a + i + kGroup) * load8(b + i + kGroup);
  }
  if (i < d) even += load8(a + i) * load8(b + i);
  return hsum(even + odd);
}

// exp(x) for x <= 0 (scores minus their running max), ~2 ulp (Cephes' expf polynomial); below -87 it is 0.
NQ_INLINE v8f exp8(v8f x) {
  const v8f zero = {};
  const v8i underflow = x < -87.0f;
  x = underflow ? zero - 87.0f : x;
  const v8f n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const v8f r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  v8f p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v8f y = p * r * r + r + 1.0f;
  const v8f two_n = reinterpret_cast<v8f>((__builtin_convertvector(n, v8i) + 127) << 23);
  return underflow ? zero : y * two_n;
}

NQ_INLINE uint32_t read_u16(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | (static_cast<uint32_t>(p[1]) << 8);
}

// Exact for every fp16 value (normals, subnormals, inf, NaN), without F16C: the exponent is rebiased by a multiply.
NQ_INLINE float fp16_to_float(uint32_t h) {
  const uint32_t magnitude = (h & 0x7FFFu) << 13;
  float f;
  std::memcpy(&f, &magnitude, sizeof(f));
  f *= 0x1p112f;
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  if ((h & 0x7C00u) == 0x7C00u) bits |= 0x7F800000u;  // inf / NaN
  bits |= (h & 0x8000u) << 16;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

struct Codebooks {
  const float* patterns;  // E8P absolute patterns [256, 8]
  const uint8_t* parity;  // [256] parity of the number of negative signs of each pattern
  const float* res8;      // RES8 points times the 3-bit code's second-stage step 1/2 [256, 8] (exact)
};

// The E8P point of a 16-bit index.
NQ_INLINE v8f e8p_point(const Codebooks& cb, uint32_t index) {
  const uint32_t p = index & 0xFFu;
  return nq::e8p_point(cb.patterns + p * kGroup, cb.parity[p], index);
}

// Unit-scale vector of `groups` groups coded at kBits from planar codes (stage-major, see codec/packing.py).
template <int kBits>
NQ_INLINE void decode_unit(const Codebooks& cb, const uint8_t* codes, int groups, float* out) {
  const uint8_t* second = codes + 2 * groups;
  for (int g = 0; g < groups; ++g) {
    v8f x = e8p_point(cb, read_u16(codes + 2 * g));
    if (kBits == 3) x += load8(cb.res8 + second[g] * kGroup);
    if (kBits == 4) x += e8p_point(cb, read_u16(second + 2 * g)) * 0.25f;
    store8(out + g * kGroup, x);
  }
}

// Online-softmax state of the gqa query heads of one (request, KV head) pair, plus one chunk of K/V rows.
struct State {
  float q[kMaxGqa * kMaxDim];  // queries times the softmax scale
  float acc[kMaxGqa * kMaxDim];
  float max[kMaxGqa];
  float sum[kMaxGqa];
  float k[kChunk * kMaxDim];  // rows of the chunk, dense [n, d]
  float v[kChunk * kMaxDim];
  float k_scale[kChunk];
  float v_scale[kChunk];
  float p[kChunk];  // scores, then weights, of one query head
};

// Reads one token-head slot of E8 pages (K at kKBits, V at kVBits per element) into unit K/V rows and their scales.
template <int kKBits, int kVBits>
struct E8Pages {
  Codebooks cb;
  int groups;

  NQ_INLINE void read(const uint8_t* slot, State& st, int t, int d) const {
    const int k_bytes = groups * kKBits, v_bytes = groups * kVBits;
    st.k_scale[t] = fp16_to_float(read_u16(slot + k_bytes + v_bytes));
    st.v_scale[t] = fp16_to_float(read_u16(slot + k_bytes + v_bytes + 2));
    decode_unit<kKBits>(cb, slot, groups, st.k + t * d);
    decode_unit<kVBits>(cb, slot + k_bytes, groups, st.v + t * d);
  }
};

enum DenseDtype { kFloat32 = 0, kFloat16 = 1, kBfloat16 = 2 };

// 16-bit float storage types of dense pages, widened 8 elements at a time.
struct Half {
  uint16_t bits;
};
struct Bfloat16 {
  uint16_t bits;
};
typedef uint16_t v8h_unaligned __attribute__((vector_size(16), aligned(2)));

NQ_INLINE v8i load_bits8(const void* p) {
  return __builtin_convertvector(*reinterpret_cast<const v8h_unaligned*>(p), v8i);
}

NQ_INLINE v8f widen8(const float* p) { return load8(p); }

NQ_INLINE v8f widen8(const Bfloat16* p) { return reinterpret_cast<v8f>(load_bits8(p) << 16); }

// fp16_to_float, 8 lanes at a time.
NQ_INLINE v8f widen8(const Half* p) {
  const v8i h = load_bits8(p);
  const v8f f = reinterpret_cast<v8f>((h & 0x7FFF) << 13) * 0x1p112f;
  const v8i special = ((h & 0x7C00) == 0x7C00) & 0x7F800000;  // inf / NaN
  return reinterpret_cast<v8f>(reinterpret_cast<v8i>(f) | special | ((h & 0x8000) << 16));
}

// Reads one [K | V] row of dense pages of element type T.
template <typename T>
struct DensePages {
  NQ_INLINE void read(const uint8_t* slot, State& st, int t, int d) const {
    const T* row = reinterpret_cast<const T*>(slot);
    for (int g = 0; g < d; g += kGroup) {
      store8(st.k + t * d + g, widen8(row + g));
      store8(st.v + t * d + g, widen8(row + d + g));
    }
    st.k_scale[t] = st.v_scale[t] = 1.0f;
  }
};

// p[t] = (q . k[t]) * k_scale[t] for the chunk's rows, 8 at a time (rows past n hold stale values, never used).
NQ_INLINE void chunk_scores(const State& st, const float* q, int d, int n, float* p) {
  for (int t0 = 0; t0 < n; t0 += kGroup) {
    v8f partial[kGroup] = {};  // one accumulator per row: 8 independent chains
    for (int g = 0; g < d; g += kGroup) {
      const v8f qg = load8(q + g);
      for (int t = 0; t < kGroup; ++t) partial[t] += qg * load8(st.k + (t0 + t) * d + g);
    }
    store8(p + t0, nq::reduce8(partial, [](v8f a, v8f b) { return a + b; }) * load8(st.k_scale + t0));
  }
}

// acc[0, 8W) = acc * correction + sum over t < n of p[t] * v[t, 0, 8W): W accumulators in registers, so the adds over
// t pipeline across them instead of forming one dependency chain per 8 columns (the same order of additions).
template <int W>
NQ_INLINE void pv_tile(const float* p, const float* v, int d, int n, float correction, float* acc) {
  v8f a[W];
  for (int w = 0; w < W; ++w) a[w] = load8(acc + w * kGroup) * correction;
  for (int t = 0; t < n; ++t) {
    const float pt = p[t];
    for (int w = 0; w < W; ++w) a[w] += pt * load8(v + t * d + w * kGroup);
  }
  for (int w = 0; w < W; ++w) store8(acc + w * kGroup, a[w]);
}

// acc[0, d) = acc * correction + p . v over the chunk's n rows of v [n, d].
NQ_INLINE void accumulate_pv(const float* p, const float* v, int d, int n, float correction, float* acc) {
  int g = 0;
  for (; g + 8 * kGroup <= d; g += 8 * kGroup) pv_tile<8>(p, v + g, d, n, correction, acc + g);
  for (; g + 4 * kGroup <= d; g += 4 * kGroup) pv_tile<4>(p, v + g, d, n, correction, acc + g);
  for (; g < d; g += kGroup) pv_tile<1>(p, v + g, d, n, correction, acc + g);
}

// Folds the n rows of the chunk into the accumulators of the gqa query heads.
NQ_INLINE void fold_chunk(State& st, int gqa, int d, int n, float softcap) {
  const int padded = (n + kGroup - 1) / kGroup * kGroup;
  for (int j = 0; j < gqa; ++j) {
    chunk_scores(st, st.q + j * d, d, n, st.p);
    if (softcap > 0.0f) {  // logit soft-capping (Gemma 2): s -> softcap * tanh(s / softcap)
      for (int t = 0; t < n; ++t) st.p[t] = softcap * std::tanh(st.p[t] / softcap);
    }
    float m = st.max[j];
    for (int t = 0; t < n; ++t) m = st.p[t] > m ? st.p[t] : m;
    const float correction = std::exp(st.max[j] - m);  // exp(-inf) = 0 on the first chunk
    v8f sum = {};
    for (int t = 0; t < padded; t += kGroup) {
      const v8f e = exp8(load8(st.p + t) - m);
      const v8i live = t + v8i{0, 1, 2, 3, 4, 5, 6, 7} < n;
      const v8f e_live = live ? e : v8f{};
      sum += e_live;
      store8(st.p + t, e_live * load8(st.v_scale + t));  // P times the value scale: the weight of each row
    }
    st.sum[j] = st.sum[j] * correction + hsum(sum);
    st.max[j] = m;
    accumulate_pv(st.p, st.v, d, n, correction, st.acc + j * d);
  }
}

// Everything about one call except the page kind.
struct Problem {
  const float* q;      // [R, Hk * gqa, d] queries in the pages' domain
  const float* k_new;  // [R, Hk, d] raw K/V of the current token
  const float* v_new;
  const uint8_t* cache;
  int64_t block_stride, head_stride, token_stride;  // bytes
  int block_size;
  const int64_t* block_table;  // [R, table_width]
  int64_t table_width;
  const int64_t* cached;  // [R] cached positions per request
  int64_t window;         // sliding window (the query at position p sees keys k with p - k < window); 0: none
  float softcap;          // logit soft-capping of the scaled scores; 0: none
  int64_t num_kv_heads;
  int gqa, d;
  float scale;  // softmax scale
  float* out;   // [R, Hk * gqa, d] float32
  bool rotate;  // q, k_new, v_new and out in the model's domain: rotate them in, un-rotate the output (E8 pages)
};

// One State per thread (ctypes calls run on several threads); its address is looked up once per call.
__attribute__((noinline)) State& thread_state() {
  static thread_local State st;
  return st;
}

template <class Pages>
NQ_INLINE void attend_pairs(const Pages& pages, const Problem& pb, int64_t pair_begin, int64_t pair_end) {
  State& st = thread_state();
  const int d = pb.d, gqa = pb.gqa;
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    const int64_t r = pair / pb.num_kv_heads, h = pair % pb.num_kv_heads;
    const float* qh = pb.q + pair * gqa * d;
    for (int i = 0; i < gqa * d; ++i) st.q[i] = qh[i] * pb.scale;
    if (pb.rotate) {
      for (int j = 0; j < gqa; ++j) nq::hadamard_rotate(st.q + j * d, d);
    }
    for (int j = 0; j < gqa; ++j) {
      st.max[j] = -std::numeric_limits<float>::infinity();
      st.sum[j] = 0.0f;
    }
    std::memset(st.acc, 0, sizeof(float) * gqa * d);
    const int64_t len = pb.cached[r];  // the query's position
    const int64_t begin = pb.window > 0 && len >= pb.window ? len - pb.window + 1 : 0;  // first key in the window
    for (int64_t start = begin - begin % pb.block_size; start < len; start += pb.block_size) {
      const int64_t block = pb.block_table[r * pb.table_width + start / pb.block_size];
      if (block == 0) continue;  // vLLM's null block: an evicted hole, masked (never read)
      const int64_t in_block = len - start < pb.block_size ? len - start : pb.block_size;
      const uint8_t* base = pb.cache + block * pb.block_stride + h * pb.head_stride;
      for (int64_t first = start < begin ? begin - start : 0; first < in_block; first += kChunk) {
        const int n = static_cast<int>(in_block - first < kChunk ? in_block - first : kChunk);
        for (int t = 0; t < n; ++t) pages.read(base + (first + t) * pb.token_stride, st, t, d);
        fold_chunk(st, gqa, d, n, pb.softcap);
      }
    }
    std::memcpy(st.k, pb.k_new + pair * d, sizeof(float) * d);  // the current token, raw
    std::memcpy(st.v, pb.v_new + pair * d, sizeof(float) * d);
    if (pb.rotate) {
      nq::hadamard_rotate(st.k, d);
      nq::hadamard_rotate(st.v, d);
    }
    st.k_scale[0] = st.v_scale[0] = 1.0f;
    fold_chunk(st, gqa, d, 1, pb.softcap);
    float* oh = pb.out + pair * gqa * d;
    for (int j = 0; j < gqa; ++j) {
      for (int i = 0; i < d; ++i) oh[j * d + i] = st.acc[j * d + i] / st.sum[j];
      if (pb.rotate) nq::hadamard_rotate(oh + j * d, d);
    }
  }
}

template <int kKBits>
NQ_INLINE void attend_e8_k(const Codebooks& cb, int v_bits, const Problem& pb, int64_t pair_begin, int64_t pair_end) {
  const int groups = pb.d / kGroup;
  if (v_bits == 2) attend_pairs(E8Pages<kKBits, 2>{cb, groups}, pb, pair_begin, pair_end);
  if (v_bits == 3) attend_pairs(E8Pages<kKBits, 3>{cb, groups}, pb, pair_begin, pair_end);
  if (v_bits == 4) attend_pairs(E8Pages<kKBits, 4>{cb, groups}, pb, pair_begin, pair_end);
}

// The bit widths become compile-time constants: no per-group branch on them in the decode loops.
NQ_HOT void attend_e8(const Codebooks& cb, int k_bits, int v_bits, const Problem& pb, int64_t pair_begin,
                      int64_t pair_end) {
  if (k_bits == 2) attend_e8_k<2>(cb, v_bits, pb, pair_begin, pair_end);
  if (k_bits == 3) attend_e8_k<3>(cb, v_bits, pb, pair_begin, pair_end);
  if (k_bits == 4) attend_e8_k<4>(cb, v_bits, pb, pair_begin, pair_end);
}

NQ_HOT void attend_dense(int dtype, const Problem& pb, int64_t pair_begin, int64_t pair_end) {
  if (dtype == kFloat32) attend_pairs(DensePages<float>{}, pb, pair_begin, pair_end);
  if (dtype == kFloat16) attend_pairs(DensePages<Half>{}, pb, pair_begin, pair_end);
  if (dtype == kBfloat16) attend_pairs(DensePages<Bfloat16>{}, pb, pair_begin, pair_end);
}

}  // namespace

extern "C" {

// Both entry points: the `pairs` = R * Hk (request, KV head) pairs, over up to `threads` OpenMP threads. q:
// [R, Hk*gqa, d] float32 queries (in the pages' domain, or for E8 pages with rotate set in the model's domain);
// k_new/v_new: [R, Hk, d] float32 K/V of the current token, same domain as q; cache: pages with byte strides
// (block, head, token); block_table: int64 [R, table_width]; cached: int64 [R] cached tokens; window: a sliding
// window (keys at positions >= cached - window + 1 only), 0 for none; softcap: logit soft-capping of the scaled
// scores, 0 for none; out: [R, Hk*gqa, d] float32, same domain as q.

// E8 pages, slot layout [K codes | V codes | K scale fp16 | V scale fp16]; tables: E8P patterns [256, 8], their sign
// parity uint8 [256], RES8 points times 1/2 [256, 8].
void nq_e8_decode_attention(const float* q, const float* k_new, const float* v_new, const uint8_t* cache,
                            int64_t block_stride, int64_t head_stride, int64_t token_stride, int block_size,
                            const int64_t* block_table, int64_t table_width, const int64_t* cached, int64_t window,
                            float softcap, int64_t num_kv_heads, int gqa, int d, float scale, int k_bits, int v_bits, const float* patterns,
                            const uint8_t* parity, const float* res8, int rotate, int64_t pairs, float* out,
                            int threads) {
  const Problem pb{q, k_new, v_new, cache, block_stride, head_stride, token_stride, block_size, block_table,
                   table_width, cached, window, softcap, num_kv_heads, gqa, d, scale, out, rotate != 0};
  const Codebooks cb{patterns, parity, res8};
  nq::parallel_rows(pairs, threads,
                    [&](int64_t begin, int64_t end) { attend_e8(cb, k_bits, v_bits, pb, begin, end); });
}

// Dense pages, one token-head's [K | V] row of 2*d elements of `dtype` (0 float32, 1 float16, 2 bfloat16).
void nq_dense_decode_attention(const float* q, const float* k_new, const float* v_new, const uint8_t* cache,
                               int64_t block_stride, int64_t head_stride, int64_t token_stride, int block_size,
                               const int64_t* block_table, int64_t table_width, const int64_t* cached,
                               int64_t window, float softcap, int64_t num_kv_heads, int gqa, int d, float scale,
                               int dtype,
                               int64_t pairs, float* out, int threads) {
  const Problem pb{q, k_new, v_new, cache, block_stride, head_stride, token_stride, block_size, block_table,
                   table_width, cached, window, softcap, num_kv_heads, gqa, d, scale, out, false};
  nq::parallel_rows(pairs, threads,
                    [&](int64_t begin, int64_t end) { attend_dense(dtype, pb, begin, end); });
}

}  // extern "C"
