// Native CPU E8 quantizer: the same algorithm as nexusquant_vllm/codec/quantizer.py (scale candidates, least-squares
// scale refit, E8P stage 1 with a 4-candidate beam at 3 bits, RES8 / E8P residual stage), one vector at a time with
// early-exit loops instead of the torch path's padded [n, 512] temporaries.
//
// Plain C ABI, called through ctypes (no torch headers, so the build needs only a C++ compiler). The codebook tables
// come from the caller (the torch codec builds them), so there is one source of truth for every codeword.
// Outputs match the torch reference except where two candidates are at exactly the same distance (float summation
// order differs), which tests bound by comparing distortion, not bytes.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "hadamard.h"
#include "parallel.h"
#include "simd.h"

namespace {

constexpr int kGroup = 8;
constexpr int kPatterns = 256;
constexpr int kClasses = 2 * kPatterns;  // (shift, pattern) classes of E8P
constexpr int kTopK = 8;                 // classes whose exact distance the bounded search computes
constexpr int kMaxBeam = 8;
constexpr int kMaxDim = 512;
constexpr float kFp16Max = 65504.0f;
constexpr float kTiny = 1e-30f;
constexpr float kShift[2] = {0.25f, -0.25f};

using nq::load8;
using nq::v8f;
using nq::v8i;

struct Tables {
  float pattern_t[kGroup][kPatterns];  // E8P absolute patterns, coordinate-major (loops over patterns vectorize)
  float pattern_norm[kPatterns];
  int parity[kPatterns];
  float pattern[kPatterns][kGroup];
  float res8_t[kGroup][kPatterns];
  float res8_norm[kPatterns];
  float res8[kPatterns][kGroup];
  const int64_t* lookup;  // [4^8]: E8P pattern of a base-4 key of |base| - 1/2, or -1
};


struct Config {
  int bits;
  int beam;
  float step2;           // scale of the second stage's codebook (0.5 at 3 bits, 0.25 at 4 bits)
  const float* scale_c;  // the m candidate multipliers of rms(x)
  int m;
};

// One target's view of the 2 x 256 (shift, pattern) classes of E8P: per shift, |t| and the signs of
// t = u - shift; per class, the distance bound with the target's signs and parity ignored. The exact distance adds
// the parity fix (flip the coordinate with the smallest |pattern_i * t_i|), computed only for classes that need it.
struct Target {
  float abs_t[2][kGroup];
  bool negative[2][kGroup];
  bool odd[2];
  float bound[kClasses];
};

NQ_INLINE void score_bounds(const Tables& tb, const float* u, Target& tg) {
  for (int s = 0; s < 2; ++s) {
    float norm = 0.0f;
    int negatives = 0;
    for (int i = 0; i < kGroup; ++i) {
      const float t = u[i] - kShift[s];
      tg.negative[s][i] = t < 0.0f;
      negatives += t < 0.0f;
      tg.abs_t[s][i] = std::fabs(t);
      norm += tg.abs_t[s][i] * tg.abs_t[s][i];
    }
    tg.odd[s] = negatives & 1;
    float gain[kPatterns] = {};
    for (int i = 0; i < kGroup; ++i) {  // coordinate-major: the inner loop over patterns vectorizes
      for (int p = 0; p < kPatterns; ++p) gain[p] += tb.pattern_t[i][p] * tg.abs_t[s][i];
    }
    for (int p = 0; p < kPatterns; ++p) tg.bound[s * kPatterns + p] = norm + tb.pattern_norm[p] - 2.0f * gain[p];
  }
}

// Coordinate whose sign flips to fix the parity of class c, or -1 when the target's signs already fit.
NQ_INLINE int flip_at(const Tables& tb, const Target& tg, int c, float* cost) {
  const int s = c / kPatterns, p = c % kPatterns;
  *cost = 0.0f;
  if (tg.odd[s] == (tb.parity[p] != 0)) return -1;
  int at = 0;
  float best = tb.pattern[p][0] * tg.abs_t[s][0];
  for (int i = 1; i < kGroup; ++i) {
    const float w = tb.pattern[p][i] * tg.abs_t[s][i];
    if (w < best) {
      best = w;
      at = i;
    }
  }
  *cost = 4.0f * best;
  return at;
}

NQ_INLINE float exact_distance(const Tables& tb, const Target& tg, int c) {
  float cost;
  flip_at(tb, tg, c, &cost);
  return tg.bound[c] + cost;
}

// The 16-bit E8P index of class c with the target's signs, parity-fixed (layout: codec/e8.py).
NQ_INLINE int32_t class_index(const Tables& tb, const Target& tg, int c) {
  const int s = c / kPatterns;
  float cost;
  const int flip = flip_at(tb, tg, c, &cost);
  int32_t index = (c % kPatterns) | (s << 15);
  for (int i = 0; i < kGroup - 1; ++i) {
    const bool neg = tg.negative[s][i] != (i == flip);
    index |= static_cast<int32_t>(neg) << (8 + i);
  }
  return index;
}

NQ_INLINE void decode_e8p(const Tables& tb, int32_t index, float* out) {
  const int p = index & 0xFF;
  int negatives = 0;
  const float shift = (index >> 15) & 1 ? -0.25f : 0.25f;
  for (int i = 0; i < kGroup - 1; ++i) {
    const int neg = (index >> (8 + i)) & 1;
    negatives += neg;
    out[i] = (neg ? -tb.pattern[p][i] : tb.pattern[p][i]) + shift;
  }
  const int neg_last = (negatives + tb.parity[p]) & 1;
  out[kGroup - 1] = (neg_last ? -tb.pattern[p][kGroup - 1] : tb.pattern[p][kGroup - 1]) + shift;
}

// Nearest point of D8 (integer vectors with an even sum), rounding half to even like torch.round.
// Only the sum's parity is needed: it is taken per coordinate, so a NaN, infinite or huge target (a NaN vector) never
// converts an out-of-range float to int. Floats of magnitude >= 2^24 are even integers.
NQ_INLINE void nearest_d8(const float* t, float* out) {
  int parity = 0, worst = 0;
  float worst_error = -1.0f;
  for (int i = 0; i < kGroup; ++i) {
    out[i] = std::rint(t[i]);
    parity ^= std::fabs(out[i]) < 16777216.0f ? static_cast<int>(out[i]) & 1 : 0;
    const float e = std::fabs(t[i] - out[i]);
    if (e > worst_error) {
      worst_error = e;
      worst = i;
    }
  }
  if (parity) out[worst] += t[worst] - out[worst] > 0.0f ? 1.0f : -1.0f;
}

// Nearest point y of the lattice E8 + 1/4 (Conway-Sloane: the closer of D8 + 1/4 and D8 + 3/4). Returns whether y
// lies in D8 + 3/4, i.e. y - 1/4 is half-integer.
NQ_INLINE bool nearest_lattice(const float* u, float* y) {
  float t[kGroup], shifted[kGroup], a[kGroup], b[kGroup];
  for (int i = 0; i < kGroup; ++i) {
    t[i] = u[i] - 0.25f;
    shifted[i] = t[i] - 0.5f;
  }
  nearest_d8(t, a);
  nearest_d8(shifted, b);
  float da = 0.0f, db = 0.0f;
  for (int i = 0; i < kGroup; ++i) {
    b[i] += 0.5f;
    da += (t[i] - a[i]) * (t[i] - a[i]);
    db += (t[i] - b[i]) * (t[i] - b[i]);
  }
  const bool half = !(da <= db);
  for (int i = 0; i < kGroup; ++i) y[i] = (half ? b[i] : a[i]) + 0.25f;
  return half;
}

// E8P index of the nearest lattice point, or -1 when that point is not an E8P codeword. E8P is a subset of the
// lattice, so a codeword found here is the nearest codeword.
NQ_INLINE int32_t lattice_e8p_index(const float* u, const int64_t* lookup) {
  float y[kGroup];
  const bool plus = nearest_lattice(u, y);
  // base = y - 1/4 (shift +1/4) when half-integer, else y + 1/4 (shift -1/4): a point of D8^.
  int64_t key = 0, weight = 1;
  int32_t signs = 0;
  for (int i = 0; i < kGroup; ++i, weight *= 4) {
    const float base = plus ? y[i] - 0.25f : y[i] + 0.25f;
    const float level = std::rint(std::fabs(base) - 0.5f);
    if (!(level >= 0.0f && level <= 3.0f)) return -1;  // also NaN: compared as a float, never cast out of range
    const int digit = static_cast<int>(level);
    key += digit * weight;
    if (i < kGroup - 1 && base < 0.0f) signs |= 1 << (8 + i);
  }
  const int64_t pattern = lookup[key];
  if (pattern < 0) return -1;
  return static_cast<int32_t>(pattern) | signs | (plus ? 0 : 1 << 15);
}

// First minimum of the exact distance over the 512 classes; a class whose bound is no smaller than the best exact
// distance so far cannot beat it and is skipped.
NQ_INLINE int exhaustive_class(const Tables& tb, const Target& tg) {
  int best = 0;
  float best_distance = exact_distance(tb, tg, 0);
  for (int c = 1; c < kClasses; ++c) {
    if (!(tg.bound[c] < best_distance)) continue;
    const float d = exact_distance(tb, tg, c);
    if (d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  return best;
}

// The kTopK+1 smallest values offered so far, ascending (ties: the earlier offer first), with their indices.
struct Smallest {
  float value[kTopK + 1];
  int index[kTopK + 1];
  int count = 0;

  NQ_INLINE void offer(float v, int c) {
    if (count == kTopK + 1 && !(v < value[kTopK])) return;
    int j = count < kTopK + 1 ? count++ : kTopK;
    while (j > 0 && v < value[j - 1]) {
      value[j] = value[j - 1];
      index[j] = index[j - 1];
      --j;
    }
    value[j] = v;
    index[j] = c;
  }
};

// Bit i set where lane i of the comparison result m is true.
NQ_INLINE unsigned lane_mask(v8i m) {
  unsigned bits = 0;
  for (int i = 0; i < kGroup; ++i) bits |= static_cast<unsigned>(m[i] & 1) << i;
  return bits;
}

// out[k] = the minimum of the 8 values at bound[8k .. 8k+8), for k < 8.
NQ_INLINE void block_mins8(const float* bound, float* out) {
  v8f rows[kGroup];
  for (int k = 0; k < kGroup; ++k) rows[k] = load8(bound + k * kGroup);
  const v8f z = nq::reduce8(rows, [](v8f a, v8f b) { return a < b ? a : b; });
  for (int k = 0; k < kGroup; ++k) out[k] = z[k];
}

// The kTopK+1 smallest of the 512 bounds, ascending: each lies in one of the kTopK+1 blocks of 8 classes with the
// smallest minima (the torch path's `_smallest` does the same), and is no larger than the largest of those minima,
// so only the classes of those blocks within that threshold are ranked (dropping larger ones changes no outcome);
// one vector compare per block finds them.
NQ_INLINE void smallest_bounds(const float* bound, int* top) {
  constexpr int kBlocks = kClasses / kGroup;
  float block_min[kBlocks];
  for (int b = 0; b < kBlocks; b += kGroup) block_mins8(bound + b * kGroup, block_min + b);
  Smallest blocks, classes;
  for (int b = 0; b < kBlocks; ++b) blocks.offer(block_min[b], b);
  const v8f threshold = v8f{} + blocks.value[kTopK];
  for (int k = 0; k < kTopK + 1; ++k) {
    const int first = blocks.index[k] * kGroup;
    const v8i within = ~(load8(bound + first) > threshold);  // NaN counts as within: kTopK+1 classes still rank
    for (unsigned m = lane_mask(within); m != 0; m &= m - 1) {
      const int c = first + __builtin_ctz(m);
      classes.offer(bound[c], c);
    }
  }
  for (int k = 0; k < kTopK + 1; ++k) top[k] = classes.index[k];
}

// `beam` stage-1 candidates, nearest first, chosen like codec/e8.py's e8p_candidates: the kTopK classes with the
// lowest bounds, ordered by exact distance; the first is replaced by the exhaustive nearest when the (kTopK+1)-th
// bound does not certify it.
NQ_INLINE void e8p_candidates(const Tables& tb, const float* u, int beam, Target& tg, int32_t* out) {
  score_bounds(tb, u, tg);
  int top[kTopK + 1];
  smallest_bounds(tg.bound, top);
  int order[kTopK];
  float exact[kTopK];
  for (int k = 0; k < kTopK; ++k) {
    const float d = exact_distance(tb, tg, top[k]);
    int j = k;
    while (j > 0 && d < exact[j - 1]) {
      order[j] = order[j - 1];
      exact[j] = exact[j - 1];
      --j;
    }
    order[j] = top[k];
    exact[j] = d;
  }
  for (int b = 0; b < beam; ++b) out[b] = class_index(tb, tg, order[b]);
  if (tg.bound[top[kTopK]] < exact[0]) out[0] = class_index(tb, tg, exhaustive_class(tb, tg));
}

// Exact nearest E8P codeword: the lattice point when it is a codeword, else the first minimum of the exact distance
// over the 512 classes, skipping those whose bound cannot beat the best so far.
NQ_INLINE int32_t nearest_e8p(const Tables& tb, const float* u, Target& tg) {
  const int32_t fast = lattice_e8p_index(u, tb.lookup);
  if (fast >= 0) return fast;
  score_bounds(tb, u, tg);
  return class_index(tb, tg, exhaustive_class(tb, tg));
}

// For each of the n residuals r[b] (n <= kMaxBeam): the first index of the smallest squared distance (up to the
// constant |r|^2) to the RES8 points. One pass over the table, 8 points at a time, serves all n (the table's rows are
// loaded once per block instead of once per residual); per lane the smallest distance and its first index, then the
// first of the lanes' minima.
template <int n>
NQ_INLINE void nearest_res8_n(const Tables& tb, const float (*r)[kGroup], int32_t* out) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  v8f best[kMaxBeam];
  v8i best_index[kMaxBeam];
  for (int b = 0; b < n; ++b) {
    best[b] = v8f{} + std::numeric_limits<float>::infinity();
    best_index[b] = v8i{};
  }
  for (int j = 0; j < kPatterns; j += kGroup) {
    v8f row[kGroup];
    for (int i = 0; i < kGroup; ++i) row[i] = load8(&tb.res8_t[i][j]);
    const v8f norm = load8(&tb.res8_norm[j]);
    for (int b = 0; b < n; ++b) {
      v8f score = {};
      for (int i = 0; i < kGroup; ++i) score += r[b][i] * row[i];
      const v8f distance = norm - 2.0f * score;
      const v8i better = distance < best[b];
      best[b] = better ? distance : best[b];
      best_index[b] = better ? lane + j : best_index[b];
    }
  }
  for (int b = 0; b < n; ++b) {
    float m = best[b][0];
    int32_t index = best_index[b][0];  // 0 for a NaN target (its vector gets a NaN scale)
    for (int l = 1; l < kGroup; ++l) {
      if (best[b][l] < m || (best[b][l] == m && best_index[b][l] < index)) {
        m = best[b][l];
        index = best_index[b][l];
      }
    }
    out[b] = index;
  }
}

// Compile-time residual counts keep every lane's best distance and index in registers; the 3-bit beam is 4.
NQ_INLINE void nearest_res8(const Tables& tb, const float (*r)[kGroup], int n, int32_t* out) {
  if (n == 4) return nearest_res8_n<4>(tb, r, out);
  for (int b = 0; b < n; ++b) nearest_res8_n<1>(tb, r + b, out + b);
}

// Codes one 8-dim unit-scale group; writes its stage indices and decoded point.
NQ_INLINE void code_group(const Tables& tb, const Config& cfg, const float* u, Target& tg, int32_t* code1,
                int32_t* code2, float* decoded) {
  if (cfg.bits == 2) {
    *code1 = nearest_e8p(tb, u, tg);
    decode_e8p(tb, *code1, decoded);
    return;
  }
  if (cfg.bits == 4) {
    float point[kGroup], residual[kGroup], second[kGroup];
    *code1 = nearest_e8p(tb, u, tg);
    decode_e8p(tb, *code1, point);
    for (int i = 0; i < kGroup; ++i) residual[i] = (u[i] - point[i]) / cfg.step2;
    *code2 = nearest_e8p(tb, residual, tg);
    decode_e8p(tb, *code2, second);
    for (int i = 0; i < kGroup; ++i) decoded[i] = point[i] + second[i] * cfg.step2;
    return;
  }
  int32_t candidates[kMaxBeam], second[kMaxBeam];
  float point[kMaxBeam][kGroup], residual[kMaxBeam][kGroup];
  e8p_candidates(tb, u, cfg.beam, tg, candidates);
  for (int b = 0; b < cfg.beam; ++b) {
    decode_e8p(tb, candidates[b], point[b]);
    for (int i = 0; i < kGroup; ++i) residual[b][i] = (u[i] - point[b][i]) / cfg.step2;
  }
  nearest_res8(tb, residual, cfg.beam, second);
  float best_error = std::numeric_limits<float>::infinity();
  for (int b = 0; b < cfg.beam; ++b) {
    float sum[kGroup];
    const int32_t j = second[b];
    float error = 0.0f;
    for (int i = 0; i < kGroup; ++i) {
      sum[i] = point[b][i] + tb.res8[j][i] * cfg.step2;
      error += (u[i] - sum[i]) * (u[i] - sum[i]);
    }
    if (b == 0 || error < best_error) {  // a NaN input keeps candidate 0
      best_error = error;
      *code1 = candidates[b];
      *code2 = j;
      for (int i = 0; i < kGroup; ++i) decoded[i] = sum[i];
    }
  }
}

NQ_INLINE float round_to_fp16(float x) { return static_cast<float>(static_cast<_Float16>(x)); }

void build_tables(const float* patterns, const int64_t* parity, const float* res8, const int64_t* lookup,
                  Tables& tb) {
  tb.lookup = lookup;
  for (int p = 0; p < kPatterns; ++p) {
    tb.pattern_norm[p] = 0.0f;
    tb.res8_norm[p] = 0.0f;
    tb.parity[p] = static_cast<int>(parity[p]);
    for (int i = 0; i < kGroup; ++i) {
      tb.pattern[p][i] = tb.pattern_t[i][p] = patterns[p * kGroup + i];
      tb.res8[p][i] = tb.res8_t[i][p] = res8[p * kGroup + i];
      tb.pattern_norm[p] += tb.pattern[p][i] * tb.pattern[p][i];
      tb.res8_norm[p] += tb.res8[p][i] * tb.res8[p][i];
    }
  }
}

// Codes one rotated vector v [d] -> stage indices code1/code2 [d/8] (code2 untouched at 2 bits) and the fp16 scale.
NQ_INLINE _Float16 quantize_row(const Tables& tb, const Config& cfg, const float* v, int64_t d, int32_t* code1,
                      int32_t* code2) {
  const int64_t groups = d / kGroup;
  Target tg;
  float unit[kGroup], decoded_buf[kMaxDim];  // d <= kMaxDim (checked by the caller)
  int32_t c1[kMaxDim / kGroup], c2[kMaxDim / kGroup] = {};
  float sq = 0.0f;
  for (int64_t i = 0; i < d; ++i) sq += v[i] * v[i];
  const float rms = std::sqrt(sq / static_cast<float>(d));
  float best_error = 0.0f;
  _Float16 best_scale = 0;
  for (int k = 0; k < cfg.m; ++k) {
    // NaN-propagating clamps (like torch's): a NaN vector gets a NaN scale and decodes to NaN.
    const float raw = rms * cfg.scale_c[k];
    const float search = raw < kTiny ? kTiny : raw;
    for (int64_t g = 0; g < groups; ++g) {
      for (int i = 0; i < kGroup; ++i) unit[i] = v[g * kGroup + i] / search;
      code_group(tb, cfg, unit, tg, &c1[g], &c2[g], &decoded_buf[g * kGroup]);
    }
    float xd = 0.0f, dd = 0.0f;
    for (int64_t i = 0; i < d; ++i) {
      xd += v[i] * decoded_buf[i];
      dd += decoded_buf[i] * decoded_buf[i];
    }
    const float fitted = xd / dd;
    const float refit = fitted > 0.0f ? fitted : search;
    const float scale = round_to_fp16(refit > kFp16Max ? kFp16Max : refit);
    float error = 0.0f;
    for (int64_t i = 0; i < d; ++i) {
      const float e = v[i] - decoded_buf[i] * scale;
      error += e * e;
    }
    if (k == 0 || error < best_error) {
      best_error = error;
      best_scale = static_cast<_Float16>(scale);
      for (int64_t g = 0; g < groups; ++g) {
        code1[g] = c1[g];
        code2[g] = c2[g];
      }
    }
  }
  return best_scale;
}

// Planar little-endian codes of one vector (codec/packing.py): all 16-bit stage-1 indices, then the stage-2 ones
// (8 bits at 3 bits per element, 16 at 4).
NQ_INLINE void pack_row(const int32_t* code1, const int32_t* code2, int64_t groups, int bits, uint8_t* out) {
  uint8_t* second = out + 2 * groups;
  for (int64_t g = 0; g < groups; ++g) {
    out[2 * g] = static_cast<uint8_t>(code1[g]);
    out[2 * g + 1] = static_cast<uint8_t>(code1[g] >> 8);
    if (bits == 3) second[g] = static_cast<uint8_t>(code2[g]);
    if (bits == 4) {
      second[2 * g] = static_cast<uint8_t>(code2[g]);
      second[2 * g + 1] = static_cast<uint8_t>(code2[g] >> 8);
    }
  }
}

NQ_INLINE bool all_finite(const float* v, int64_t d) {
  bool finite = true;
  for (int64_t i = 0; i < d; ++i) finite &= std::isfinite(v[i]);
  return finite;
}

// Rotates and codes one K or V vector into its part of a slot (codes at `codes`, fp16 scale at `scale`); a vector
// whose raw values are not all finite gets a NaN scale, as codec.kv.encode_vectors does.
NQ_INLINE void store_vector(const Tables& tb, const Config& cfg, const float* raw, int64_t d, uint8_t* codes, uint8_t* scale) {
  float rotated[kMaxDim];
  std::memcpy(rotated, raw, sizeof(float) * d);
  nq::hadamard_rotate(rotated, d);
  int32_t code1[kMaxDim / kGroup], code2[kMaxDim / kGroup] = {};
  _Float16 s = quantize_row(tb, cfg, rotated, d, code1, code2);
  if (!all_finite(raw, d)) s = static_cast<_Float16>(std::numeric_limits<float>::quiet_NaN());
  pack_row(code1, code2, d / kGroup, cfg.bits, codes);
  std::memcpy(scale, &s, sizeof(s));
}

// Where store_rows writes: token-head row r goes to slot_mapping[r / num_kv_heads] (negative: skipped), head
// r % num_kv_heads, of the uint8 pages at `cache` (byte strides).
struct Pages {
  const int64_t* slot_mapping;
  uint8_t* cache;
  int64_t block_stride, head_stride, token_stride, block_size, num_kv_heads;
};

// Each entry point codes its rows in one function with an AVX2 clone, chosen at load time by CPU feature (-march
// stays portable; not "arch=haswell", which is picked by CPU model, so AMD CPUs never ran it). Every helper above is
// inlined into it, so the clone covers the whole search, rounding included (SSE4.1's roundss instead of a libm
// call). No FMA: the clone keeps the default build's rounding, hence its codes.
#define NQ_HOT __attribute__((target_clones("avx2", "default")))

NQ_HOT void quantize_rows(const Tables& tb, const Config& cfg, const float* x, int64_t d, int64_t begin, int64_t end,
                          int32_t* code1, int32_t* code2, _Float16* scale_out) {
  const int64_t groups = d / kGroup;
  for (int64_t row = begin; row < end; ++row) {
    scale_out[row] = quantize_row(tb, cfg, x + row * d, d, code1 + row * groups, code2 + row * groups);
  }
}

NQ_HOT void store_rows(const Tables& tb, const Config& k_cfg, const Config& v_cfg, const float* k, const float* v,
                       int64_t d, const Pages& pg, int64_t begin, int64_t end) {
  const int64_t k_bytes = d / kGroup * k_cfg.bits, v_bytes = d / kGroup * v_cfg.bits;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t slot_id = pg.slot_mapping[row / pg.num_kv_heads];
    if (slot_id < 0) continue;
    uint8_t* slot = pg.cache + slot_id / pg.block_size * pg.block_stride + (row % pg.num_kv_heads) * pg.head_stride +
                    slot_id % pg.block_size * pg.token_stride;
    store_vector(tb, k_cfg, k + row * d, d, slot, slot + k_bytes + v_bytes);
    store_vector(tb, v_cfg, v + row * d, d, slot + k_bytes, slot + k_bytes + v_bytes + 2);
  }
}

}  // namespace

extern "C" {

// Quantizes the n rows of x (float32 [n, d], rotated vectors) -> stage indices (int32 [n, d/8] each; code2 unused
// at 2 bits) and fp16 scales (as float16 [n]), over up to `threads` OpenMP threads. Tables: E8P patterns [256, 8],
// their parity [256], RES8 points [256, 8], lattice-point -> pattern lookup [4^8]; scale_c: the m candidate
// multipliers of rms(x).
void nq_e8_quantize(const float* x, int64_t n, int64_t d, int bits, int beam, float step2, const float* scale_c,
                    int m, const float* patterns, const int64_t* parity, const float* res8, const int64_t* lookup,
                    int32_t* code1, int32_t* code2, _Float16* scale_out, int threads) {
  Tables tb;  // rebuilt per call (~4K stores): the caller's tables are the single source of every codeword
  build_tables(patterns, parity, res8, lookup, tb);
  const Config cfg{bits, beam < kMaxBeam ? beam : kMaxBeam, step2, scale_c, m};
  nq::parallel_rows(n, threads, [&](int64_t begin, int64_t end) {
    quantize_rows(tb, cfg, x, d, begin, end, code1, code2, scale_out);
  });
}

// The store of one layer: the n token-heads (row = token * num_kv_heads + head) of K and V (float32
// [n / num_kv_heads, num_kv_heads, d], the model's domain) are rotated, coded and written into their slots
// [K codes | V codes | K scale fp16 | V scale fp16] of the uint8 pages `cache` (byte strides per block, head and
// token), at slot_mapping[token] (block * block_size + offset; negative: a padding token, skipped), over up to
// `threads` OpenMP threads. Per K and V: bits, beam, second-stage step and the m candidate scale multipliers.
void nq_e8_store(const float* k, const float* v, int64_t n, int64_t d, int64_t num_kv_heads,
                 const int64_t* slot_mapping, uint8_t* cache, int64_t block_stride, int64_t head_stride,
                 int64_t token_stride, int64_t block_size, int k_bits, int k_beam, float k_step2,
                 const float* k_scale_c, int k_m, int v_bits, int v_beam, float v_step2, const float* v_scale_c,
                 int v_m, const float* patterns, const int64_t* parity, const float* res8, const int64_t* lookup,
                 int threads) {
  Tables tb;
  build_tables(patterns, parity, res8, lookup, tb);
  const Config k_cfg{k_bits, k_beam < kMaxBeam ? k_beam : kMaxBeam, k_step2, k_scale_c, k_m};
  const Config v_cfg{v_bits, v_beam < kMaxBeam ? v_beam : kMaxBeam, v_step2, v_scale_c, v_m};
  const Pages pages{slot_mapping, cache, block_stride, head_stride, token_stride, block_size, num_kv_heads};
  nq::parallel_rows(n, threads, [&](int64_t begin, int64_t end) {
    store_rows(tb, k_cfg, v_cfg, k, v, d, pages, begin, end);
  });
}

}  // extern "C"
