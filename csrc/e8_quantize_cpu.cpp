// Native CPU E8 quantizer: the same algorithm as nexusquant_vllm/codec/quantizer.py (scale candidates, least-squares
// scale refit, E8P stage 1 with a 4-candidate beam at 3 bits, RES8 / E8P residual stage), one vector at a time in
// 8-lane vector code (the class selection branch-free) instead of the torch path's padded [n, 512] temporaries.
//
// Plain C ABI, called through ctypes (no torch headers, so the build needs only a C++ compiler). The codebook tables
// come from the caller (the torch codec builds them), so there is one source of truth for every codeword.
// Outputs match the torch reference except where two candidates are at exactly the same distance (float summation
// order differs), which tests bound by comparing distortion, not bytes.

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

// RES8 by orbit under coordinate permutations (the table is closed under them up to where its norm-sorted list is
// cut at 256 points, which leaves some orbits partial). Over one orbit, <r, y> is largest for the y that orders its
// coordinates like r's (the rearrangement inequality), so one sort of the residual gives every orbit's nearest
// point and a lower bound of its distance. Members are stored again, orbit by orbit, for the orbits whose nearest
// point the cut removed: those are scanned.
constexpr int kMaxOrbits = kGroup;  // one vector of orbit bounds
constexpr int kMembers = kPatterns + kGroup * kMaxOrbits;  // each orbit's run padded to a multiple of 8
constexpr int kHashSlots = 1024;

struct Res8Orbits {
  int count;                          // orbits; 0 when the table has more than kMaxOrbits (every search scans)
  float sorted_t[kGroup][kMaxOrbits];  // each orbit's coordinates in descending order, coordinate-major
  float norm[kMaxOrbits];
  uint8_t code[kMaxOrbits][kGroup];  // 4y + 8 of the sorted coordinates (RES8 coordinates are multiples of 1/4)
  int begin[kMaxOrbits + 1];         // orbit o's members: [begin[o], begin[o + 1]), padding with infinite norm
  float member_t[kGroup][kMembers];
  float member_norm[kMembers];
  int32_t member_index[kMembers];
  uint64_t hash_key[kHashSlots];  // point key (5 bits per coordinate code) -> RES8 index, linear probing; 0: empty
  int32_t hash_index[kHashSlots];
};

struct Tables {
  float pattern_t[kGroup][kPatterns];  // E8P absolute patterns, coordinate-major (loops over patterns vectorize)
  float pattern_norm[kPatterns];
  int parity[kPatterns];
  float pattern[kPatterns][kGroup];
  float res8[kPatterns][kGroup];
  const int64_t* lookup;  // [4^8]: E8P pattern of a base-4 key of |base| - 1/2, or -1
  Res8Orbits orbits;
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

// The target's signs and |t| per shift (what class_index and flip_at read); returns |t|^2 per shift in `norm`.
NQ_INLINE void prepare_target(const float* u, Target& tg, float* norm) {
  for (int s = 0; s < 2; ++s) {
    norm[s] = 0.0f;
    int negatives = 0;
    for (int i = 0; i < kGroup; ++i) {
      const float t = u[i] - kShift[s];
      tg.negative[s][i] = t < 0.0f;
      negatives += t < 0.0f;
      tg.abs_t[s][i] = std::fabs(t);
      norm[s] += tg.abs_t[s][i] * tg.abs_t[s][i];
    }
    tg.odd[s] = negatives & 1;
  }
}

NQ_INLINE v8f min8(v8f a, v8f b) { return a < b ? a : b; }
NQ_INLINE v8i min8(v8i a, v8i b) { return a < b ? a : b; }

// For the 8 patterns p..p+7 (coordinate-major table) and both shifts: the gains sum_i pattern_i * |t_i|, summed over
// the coordinates in order 0..7, and with kSmallest their smallest term (a quarter of the parity fix's cost).
template <bool kSmallest>
NQ_INLINE void pattern_gains(const Tables& tb, const float (&abs_t)[2][kGroup], int p, v8f* gain, v8f* smallest) {
  for (int s = 0; s < 2; ++s) gain[s] = v8f{};
  if (kSmallest) {
    for (int s = 0; s < 2; ++s) smallest[s] = v8f{} + std::numeric_limits<float>::infinity();
  }
  for (int i = 0; i < kGroup; ++i) {
    const v8f column = load8(&tb.pattern_t[i][p]);
    for (int s = 0; s < 2; ++s) {
      const v8f w = column * abs_t[s][i];
      gain[s] += w;
      if (kSmallest) smallest[s] = min8(smallest[s], w);
    }
  }
}

// Every class's bound |t|^2 + |pattern|^2 - 2 * gain (doubling is exact, so these are the distances nearest_class
// computes before the parity cost).
NQ_INLINE void score_bounds(const Tables& tb, const float* u, Target& tg) {
  float norm[2];
  prepare_target(u, tg, norm);
  float abs_t[2][kGroup];  // a local copy: the stores to tg.bound would otherwise make every pass reload tg.abs_t
  std::memcpy(abs_t, tg.abs_t, sizeof(abs_t));
  for (int p = 0; p < kPatterns; p += kGroup) {
    v8f gain[2];
    pattern_gains<false>(tb, abs_t, p, gain, nullptr);
    const v8f pattern_norm = load8(&tb.pattern_norm[p]);
    for (int s = 0; s < 2; ++s) nq::store8(&tg.bound[s * kPatterns + p], norm[s] + pattern_norm - (gain[s] + gain[s]));
  }
}

// The smallest lane of v, in every lane.
template <class V>
NQ_INLINE V lane_min(V m) {
  m = min8(m, __builtin_shuffle(m, v8i{4, 5, 6, 7, 0, 1, 2, 3}));
  m = min8(m, __builtin_shuffle(m, v8i{2, 3, 0, 1, 6, 7, 4, 5}));
  return min8(m, __builtin_shuffle(m, v8i{1, 0, 3, 2, 5, 4, 7, 6}));
}

// Bit i set where lane i of the comparison result m is true (all ones); two shuffle-adds fold the lanes.
NQ_INLINE unsigned lane_mask(v8i m) {
  const v8i x = m & v8i{1, 2, 4, 8, 16, 32, 64, 128};
  const v8i y = x + __builtin_shuffle(x, v8i{4, 5, 6, 7, 0, 1, 2, 3});
  const v8i z = y + __builtin_shuffle(y, v8i{2, 3, 0, 1, 6, 7, 4, 5});
  return static_cast<unsigned>(z[0] + z[1]);
}

// Coordinate whose sign flips to fix the parity of class c (the first with the smallest |pattern_i * t_i|), or -1
// when the target's signs already fit; without branches (their outcome is a coin toss per class).
NQ_INLINE int flip_at(const Tables& tb, const Target& tg, int c, float* cost) {
  const int s = c / kPatterns, p = c % kPatterns;
  const v8f w = load8(tb.pattern[p]) * load8(tg.abs_t[s]);
  const v8f smallest = lane_min(w);
  const int at = __builtin_ctz(lane_mask(w == smallest) | 0x100) & 7;  // 0 where a NaN hides the minimum
  const bool wrong = tg.odd[s] != (tb.parity[p] != 0);
  *cost = wrong ? 4.0f * smallest[0] : 0.0f;
  return wrong ? at : -1;
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

NQ_INLINE v8f decode_e8p(const Tables& tb, int32_t index) {
  const int p = index & 0xFF;
  return nq::e8p_point(tb.pattern[p], tb.parity[p], static_cast<uint32_t>(index));
}

// Lane-wise round half to even (torch.round) by adding and subtracting 1.5 * 2^23: exact for |x| < 2^22. Larger
// lanes (unit-scale targets have |u_i| <= sqrt(d) / min(scale_c), unless the vector's rms underflows to 0 and it is
// searched at the kTiny floor) and NaN give other far-away or NaN values, which lattice_e8p_index rejects, since no
// codeword lies there.
NQ_INLINE v8f round_even(v8f x) { return (x + 12582912.0f) - 12582912.0f; }

NQ_INLINE v8f abs8(v8f x) { return reinterpret_cast<v8f>(reinterpret_cast<v8i>(x) & 0x7FFFFFFF); }

// Nearest point of D8 (integer vectors with an even sum) to t, rounding half to even; an odd sum moves the first
// coordinate with the largest rounding error one step towards t. Only the lanes' parities are converted to int,
// those of lanes that are NaN or large read as even.
NQ_INLINE v8f nearest_d8(v8f t) {
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const v8f r = round_even(t);
  const v8f e = abs8(t - r);
  const v8i small = abs8(r) < 16777216.0f;  // false for NaN
  const v8i odd_lane = (__builtin_convertvector(small ? r : v8f{}, v8i) & 1) != 0;
  const v8f worst = -lane_min(-e);
  const int at = __builtin_ctz(lane_mask(e == worst) | 0x100) & 7;
  const v8i fix = (lane == at) & -static_cast<int>(__builtin_popcount(lane_mask(odd_lane)) & 1);
  const v8f step = t - r > 0.0f ? v8f{} + 1.0f : v8f{} - 1.0f;
  return fix ? r + step : r;
}

// The sum of the lanes, in lane order.
NQ_INLINE float lane_sum(v8f x) {
  float sum = 0.0f;
  for (int i = 0; i < kGroup; ++i) sum += x[i];
  return sum;
}

// The nearest point of the lattice E8 + 1/4 to u (Conway-Sloane: the closer of D8 + 1/4 and D8 + 3/4), as the
// point of D8^ it is shifted from: y = base + 1/4 when `half` (y in D8 + 3/4), else y = base - 1/4.
NQ_INLINE v8f nearest_lattice(v8f u, bool& half) {
  const v8f t = u - 0.25f;
  const v8f a = nearest_d8(t);
  const v8f b = nearest_d8(t - 0.5f) + 0.5f;
  half = !(lane_sum((t - a) * (t - a)) <= lane_sum((t - b) * (t - b)));
  return half ? b : a + 0.5f;
}

// E8P index of the nearest lattice point to u, or -1 when that point is not an E8P codeword. E8P is a subset of
// the lattice, so a codeword found here is the nearest codeword. The pattern is looked up by the base-4 key of
// |base| - 1/2.
NQ_INLINE int32_t lattice_e8p_index(const float* u, const int64_t* lookup) {
  bool half;
  const v8f base = nearest_lattice(load8(u), half);
  const v8f level = round_even(abs8(base) - 0.5f);
  if (lane_mask((level >= 0.0f) & (level <= 3.0f)) != 0xFFu) return -1;  // also NaN
  const v8f digit_weight = {1.0f, 4.0f, 16.0f, 64.0f, 256.0f, 1024.0f, 4096.0f, 16384.0f};
  const int64_t pattern = lookup[static_cast<int>(lane_sum(level * digit_weight))];
  if (pattern < 0) return -1;
  const int32_t signs = static_cast<int32_t>(lane_mask(base < 0.0f) & 0x7Fu) << 8;
  return static_cast<int32_t>(pattern) | signs | (half ? 0 : 1 << 15);
}

// The nearest (shift, pattern) class by exact distance, the first in class order among equals: all 512 classes
// scored in closed form, 8 patterns of both shifts at a time, branch-free. Its distances round exactly like
// score_bounds' bound plus exact_distance's parity cost.
NQ_INLINE int nearest_class(const Tables& tb, const float* u, Target& tg) {
  float norm[2];
  prepare_target(u, tg, norm);
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  const v8f inf = v8f{} + std::numeric_limits<float>::infinity();
  v8f best[2] = {inf, inf};
  v8i best_class[2] = {};
  for (int p = 0; p < kPatterns; p += kGroup) {
    v8f gain[2], smallest[2];
    pattern_gains<true>(tb, tg.abs_t, p, gain, smallest);
    const v8f pattern_norm = load8(&tb.pattern_norm[p]);
    const v8i parity = *reinterpret_cast<const nq::v8i_unaligned*>(&tb.parity[p]);
    for (int s = 0; s < 2; ++s) {
      const v8f bound = norm[s] + pattern_norm - (gain[s] + gain[s]);
      const v8f exact = bound + (parity != static_cast<int>(tg.odd[s]) ? 4.0f * smallest[s] : v8f{});
      const v8i better = exact < best[s];
      best[s] = better ? exact : best[s];
      best_class[s] = better ? lane + (s * kPatterns + p) : best_class[s];
    }
  }
  const v8i second = best[1] < best[0];  // shift 1's classes come later: it wins only when strictly nearer
  const v8f distance = second ? best[1] : best[0];
  const v8i cls = second ? best_class[1] : best_class[0];
  const v8i nearest = distance == lane_min(distance) ? cls : v8i{} + kClasses;
  return lane_min(nearest)[0];
}

// Per 8-bit lane mask, the lanes that are set, in order (then zeros): a shuffle that left-packs them.
struct PackTable {
  v8i lanes[256];

  PackTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      lanes[mask] = v8i{};
      for (int i = 0; i < kGroup; ++i) {
        if (mask >> i & 1) lanes[mask][n++] = i;
      }
    }
  }
};
const PackTable kPack;

// Appends the lanes of `values` where `within` is set to out[count..] (8 lanes are written); returns the new count.
NQ_INLINE int append_lanes(v8i values, v8i within, int32_t* out, int count) {
  const unsigned mask = lane_mask(within);
  *reinterpret_cast<nq::v8i_unaligned*>(out + count) = __builtin_shuffle(values, kPack.lanes[mask]);
  return count + __builtin_popcount(mask);
}

// The smallest lane of the 8 vectors v, in every lane.
NQ_INLINE v8f smallest_lane(const v8f* v) {
  v8f m = v[0];
  for (int k = 1; k < kGroup; ++k) m = min8(m, v[k]);
  return lane_min(m);
}

// The 16 smallest values offered so far, ascending in two vectors (ties: the earlier offer first), with their
// indices; inserting is branch-free: R[i] = L[i-1] where v < L[i-1], else v where v < L[i], else L[i].
struct Sorted16 {
  v8f lo = v8f{} + std::numeric_limits<float>::infinity(), hi = lo;
  v8i lo_index = {}, hi_index = {};

  NQ_INLINE void offer(float v, int32_t index) {
    const v8i up = {0, 8, 9, 10, 11, 12, 13, 14}, carry = {7, 8, 9, 10, 11, 12, 13, 14};
    const v8f lowest = v8f{} - std::numeric_limits<float>::infinity();
    const v8f lo_prev = __builtin_shuffle(lowest, lo, up), hi_prev = __builtin_shuffle(lo, hi, carry);
    const v8i lo_index_prev = __builtin_shuffle(lo_index, lo_index, up);
    const v8i hi_index_prev = __builtin_shuffle(lo_index, hi_index, carry);
    const v8i lo_shift = v < lo_prev, hi_shift = v < hi_prev, lo_here = v < lo, hi_here = v < hi;
    lo = lo_shift ? lo_prev : (lo_here ? v8f{} + v : lo);
    hi = hi_shift ? hi_prev : (hi_here ? v8f{} + v : hi);
    lo_index = lo_shift ? lo_index_prev : (lo_here ? v8i{} + index : lo_index);
    hi_index = hi_shift ? hi_index_prev : (hi_here ? v8i{} + index : hi_index);
  }
};

// The kTopK+1 smallest of the 512 bounds, ascending. Each lies in one of the kTopK+1 blocks of 8 classes with the
// smallest minima (the torch path's `_smallest` does the same), so it is no larger than T, the (kTopK+1)-th smallest
// block minimum: only the classes within T are ranked. Branch-free but for two short loops, since mispredicted
// branches were most of this search's time: T by removing the smallest block minimum left kTopK times (a tie removes
// all its copies at once, which can only raise T: more classes ranked, none lost); the blocks, then the classes,
// within T left-packed into lists; each class inserted into a sorted vector pair.
NQ_INLINE void smallest_bounds(const float* bound, int* top) {
  static_assert(kTopK + 1 <= 16, "Sorted16 holds the ranking");
  constexpr int kRows = kClasses / kGroup / kGroup;  // rows of 8 block minima
  const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
  v8f block_min[kRows], left[kRows];
  for (int r = 0; r < kRows; ++r) {
    v8f blocks[kGroup];
    for (int k = 0; k < kGroup; ++k) blocks[k] = load8(bound + (r * kGroup + k) * kGroup);
    block_min[r] = left[r] = nq::reduce8(blocks, [](v8f a, v8f b) { return min8(a, b); });
  }
  const v8f removed = v8f{} + std::numeric_limits<float>::infinity();
  for (int k = 0; k < kTopK; ++k) {
    const v8f m = smallest_lane(left);
    for (int r = 0; r < kRows; ++r) left[r] = left[r] == m ? removed : left[r];
  }
  const v8f threshold = smallest_lane(left);
  int32_t blocks[kClasses / kGroup + kGroup], classes[kClasses + kGroup];
  int num_blocks = 0, num_classes = 0;
  for (int r = 0; r < kRows; ++r) {
    num_blocks = append_lanes(lane + r * kGroup, ~(block_min[r] > threshold), blocks, num_blocks);
  }
  for (int b = 0; b < num_blocks; ++b) {
    const int first = blocks[b] * kGroup;  // NaN counts as within
    num_classes = append_lanes(lane + first, ~(load8(bound + first) > threshold), classes, num_classes);
  }
  Sorted16 ranked;
  for (int k = 0; k < num_classes; ++k) ranked.offer(bound[classes[k]], classes[k]);
  for (int k = 0; k < kTopK + 1; ++k) top[k] = k < kGroup ? ranked.lo_index[k] : ranked.hi_index[k - kGroup];
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
  if (tg.bound[top[kTopK]] < exact[0]) out[0] = class_index(tb, tg, nearest_class(tb, u, tg));
}

// Exact nearest E8P codeword: the lattice point when it is a codeword, else the nearest class with the target's
// signs (the torch path's e8p_encode gets the same point through its certified bounded search).
NQ_INLINE int32_t nearest_e8p(const Tables& tb, const float* u, Target& tg) {
  const int32_t fast = lattice_e8p_index(u, tb.lookup);
  return fast >= 0 ? fast : class_index(tb, tg, nearest_class(tb, u, tg));
}

NQ_INLINE uint64_t point_key(const uint8_t* code, const int* position) {
  uint64_t key = 0;
  for (int k = 0; k < kGroup; ++k) key |= static_cast<uint64_t>(code[k]) << (5 * position[k]);
  return key;
}

NQ_INLINE unsigned hash_slot(uint64_t key) { return static_cast<unsigned>((key * 0x9E3779B97F4A7C15ull) >> 54); }

// RES8 index of orbit o's point whose k-th largest coordinate sits at position[k], or -1 if the table lacks it.
NQ_INLINE int32_t orbit_point(const Res8Orbits& ob, int o, const int* position) {
  const uint64_t key = point_key(ob.code[o], position);
  for (unsigned h = hash_slot(key);; h = (h + 1) % kHashSlots) {
    if (ob.hash_key[h] == key) return ob.hash_index[h];
    if (ob.hash_key[h] == 0) return -1;
  }
}

// One layer of a sorting network on the 8 lanes of (value, position): lane i pairs with lane partner[i] and keeps
// the larger value where it is the lower lane of its pair (keep_max), else the smaller; unpaired lanes pair with
// themselves. Ties keep both lanes as they are.
NQ_INLINE void sort_layer(v8f& value, v8i& position, v8i partner, v8i keep_max) {
  const v8f other = __builtin_shuffle(value, partner);
  const v8i other_position = __builtin_shuffle(position, partner);
  const v8i take = (keep_max & (other > value)) | (~keep_max & (other < value));
  value = take ? other : value;
  position = take ? other_position : position;
}

// r sorted in descending order (values, and the positions they came from), by the 19-comparator sorting network
// for 8 inputs in 6 layers, in registers.
NQ_INLINE void sort_descending(const float* r, float* value, int* position) {
  v8f v = load8(r);
  v8i pos = {0, 1, 2, 3, 4, 5, 6, 7};
  sort_layer(v, pos, v8i{2, 3, 0, 1, 6, 7, 4, 5}, v8i{-1, -1, 0, 0, -1, -1, 0, 0});
  sort_layer(v, pos, v8i{4, 5, 6, 7, 0, 1, 2, 3}, v8i{-1, -1, -1, -1, 0, 0, 0, 0});
  sort_layer(v, pos, v8i{1, 0, 3, 2, 5, 4, 7, 6}, v8i{-1, 0, -1, 0, -1, 0, -1, 0});
  sort_layer(v, pos, v8i{0, 1, 4, 5, 2, 3, 6, 7}, v8i{0, 0, -1, -1, 0, 0, 0, 0});
  sort_layer(v, pos, v8i{0, 4, 2, 6, 1, 5, 3, 7}, v8i{0, -1, 0, -1, 0, 0, 0, 0});
  sort_layer(v, pos, v8i{0, 2, 1, 4, 3, 6, 5, 7}, v8i{0, -1, 0, -1, 0, -1, 0, 0});
  nq::store8(value, v);
  *reinterpret_cast<nq::v8i_unaligned*>(position) = pos;
}

// The nearest member of members [begin, end) to r by the exhaustive scan's distance |y|^2 - <2r, y>, folded into
// (best, best_index); among equal distances the smallest index wins, as in a scan of the whole table.
NQ_INLINE void scan_members(const Res8Orbits& ob, const float* twice_r, int begin, int end, float& best,
                            int32_t& best_index) {
  v8f lane_best = v8f{} + std::numeric_limits<float>::infinity();
  v8i lane_index = v8i{} + kPatterns;
  for (int j = begin; j < end; j += kGroup) {
    v8f twice_score = {};
    for (int i = 0; i < kGroup; ++i) twice_score += twice_r[i] * load8(&ob.member_t[i][j]);
    const v8f distance = load8(&ob.member_norm[j]) - twice_score;
    const v8i index = *reinterpret_cast<const nq::v8i_unaligned*>(&ob.member_index[j]);
    const v8i better = (distance < lane_best) | ((distance == lane_best) & (index < lane_index));
    lane_best = better ? distance : lane_best;
    lane_index = better ? index : lane_index;
  }
  for (int l = 0; l < kGroup; ++l) {
    if (lane_best[l] < best || (lane_best[l] == best && lane_index[l] < best_index)) {
      best = lane_best[l];
      best_index = lane_index[l];
    }
  }
}

// Exact nearest RES8 point of residual r (the exhaustive scan's answer up to float rounding at near ties). One sort
// gives every orbit's distance bound; the orbit with the smallest bound is searched first, through its nearest
// point when the table holds it (then no other orbit can be nearer), else by scanning its members; then every other
// orbit whose bound does not exceed the best distance found.
NQ_INLINE int32_t nearest_res8(const Res8Orbits& ob, const float* r) {
  float twice_r[kGroup];
  for (int i = 0; i < kGroup; ++i) twice_r[i] = 2.0f * r[i];
  float best = std::numeric_limits<float>::infinity();
  int32_t best_index = kPatterns;
  if (ob.count == 0) {
    scan_members(ob, twice_r, 0, ob.begin[1], best, best_index);
    return best_index < kPatterns ? best_index : 0;  // 0 for a NaN target (its vector gets a NaN scale)
  }
  float value[kGroup];
  int position[kGroup];
  sort_descending(r, value, position);
  v8f twice_score = {};
  for (int k = 0; k < kGroup; ++k) twice_score += (2.0f * value[k]) * load8(ob.sorted_t[k]);
  const v8f bound = load8(ob.norm) - twice_score;
  const v8f smallest = lane_min(bound);
  unsigned todo = lane_mask(bound < std::numeric_limits<float>::infinity());  // orbits, less NaN bounds
  const int first = __builtin_ctz(lane_mask(bound == smallest) | 0x100) & 7;
  for (int o = first; todo & (1u << o); o = __builtin_ctz(todo | 0x100) & 7) {
    todo &= ~(1u << o);
    const int32_t index = orbit_point(ob, o, position);
    if (index < 0) {
      scan_members(ob, twice_r, ob.begin[o], ob.begin[o + 1], best, best_index);
    } else if (bound[o] < best || (bound[o] == best && index < best_index)) {
      best = bound[o];
      best_index = index;
    }
    todo &= lane_mask(bound <= best);
  }
  return best_index < kPatterns ? best_index : 0;
}

// Codes one 8-dim unit-scale group; writes its stage indices and decoded point.
NQ_INLINE void code_group(const Tables& tb, const Config& cfg, const float* u, Target& tg, int32_t* code1,
                          int32_t* code2, float* decoded) {
  const v8f target = load8(u);
  if (cfg.bits == 2) {
    *code1 = nearest_e8p(tb, u, tg);
    nq::store8(decoded, decode_e8p(tb, *code1));
    return;
  }
  if (cfg.bits == 4) {
    float residual[kGroup];
    *code1 = nearest_e8p(tb, u, tg);
    const v8f point = decode_e8p(tb, *code1);
    nq::store8(residual, (target - point) / cfg.step2);
    *code2 = nearest_e8p(tb, residual, tg);
    nq::store8(decoded, point + decode_e8p(tb, *code2) * cfg.step2);
    return;
  }
  int32_t candidates[kMaxBeam], second[kMaxBeam];
  v8f point[kMaxBeam];
  float residual[kMaxBeam][kGroup];
  e8p_candidates(tb, u, cfg.beam, tg, candidates);
  for (int b = 0; b < cfg.beam; ++b) {
    point[b] = decode_e8p(tb, candidates[b]);
    nq::store8(residual[b], (target - point[b]) / cfg.step2);
  }
  for (int b = 0; b < cfg.beam; ++b) second[b] = nearest_res8(tb.orbits, residual[b]);
  float best_error = std::numeric_limits<float>::infinity();
  for (int b = 0; b < cfg.beam; ++b) {
    const v8f sum = point[b] + load8(tb.res8[second[b]]) * cfg.step2;
    const v8f e = (target - sum) * (target - sum);
    float error = 0.0f;
    for (int i = 0; i < kGroup; ++i) error += e[i];  // in order, like the reference's rounding
    if (b == 0 || error < best_error) {  // a NaN input keeps candidate 0
      best_error = error;
      *code1 = candidates[b];
      *code2 = second[b];
      nq::store8(decoded, sum);
    }
  }
}

NQ_INLINE float round_to_fp16(float x) { return static_cast<float>(static_cast<_Float16>(x)); }

// RES8's orbits (see Res8Orbits): the distinct descending-sorted points, each orbit's members and the point ->
// index hash. A table with more than kMaxOrbits orbits gets count 0 and one run of all its points.
void build_orbits(const float (*res8)[kGroup], Res8Orbits& ob) {
  int orbit_of[kPatterns];
  ob.count = 0;
  for (int p = 0; p < kPatterns; ++p) {
    float sorted[kGroup];
    int position[kGroup];
    sort_descending(res8[p], sorted, position);
    int o = 0;
    for (; o < ob.count; ++o) {
      bool same = true;
      for (int k = 0; k < kGroup; ++k) same &= ob.sorted_t[k][o] == sorted[k];
      if (same) break;
    }
    if (o == kMaxOrbits) {
      ob.count = 0;
      break;
    }
    if (o == ob.count) {
      ++ob.count;
      ob.norm[o] = 0.0f;
      for (int k = 0; k < kGroup; ++k) {
        ob.sorted_t[k][o] = sorted[k];
        ob.code[o][k] = static_cast<uint8_t>(std::lrint(4.0f * sorted[k]) + 8);
        ob.norm[o] += sorted[k] * sorted[k];
      }
    }
    orbit_of[p] = o;
  }
  for (int o = ob.count; o < (ob.count + kGroup - 1) / kGroup * kGroup; ++o) {  // lanes past the last orbit
    ob.norm[o] = std::numeric_limits<float>::infinity();
    for (int k = 0; k < kGroup; ++k) ob.sorted_t[k][o] = 0.0f;
  }
  const int orbits = ob.count > 0 ? ob.count : 1;
  int next = 0;
  for (int o = 0; o < orbits; ++o) {
    ob.begin[o] = next;
    for (int p = 0; p < kPatterns; ++p) {
      if (ob.count > 0 && orbit_of[p] != o) continue;
      for (int i = 0; i < kGroup; ++i) ob.member_t[i][next] = res8[p][i];
      ob.member_norm[next] = 0.0f;
      for (int i = 0; i < kGroup; ++i) ob.member_norm[next] += res8[p][i] * res8[p][i];
      ob.member_index[next++] = p;
    }
    for (; next % kGroup; ++next) {
      for (int i = 0; i < kGroup; ++i) ob.member_t[i][next] = 0.0f;
      ob.member_norm[next] = std::numeric_limits<float>::infinity();
      ob.member_index[next] = kPatterns;
    }
  }
  ob.begin[orbits] = next;
  std::memset(ob.hash_key, 0, sizeof(ob.hash_key));
  for (int p = 0; ob.count > 0 && p < kPatterns; ++p) {
    uint8_t code[kGroup];
    int position[kGroup];
    for (int i = 0; i < kGroup; ++i) {
      code[i] = static_cast<uint8_t>(std::lrint(4.0f * res8[p][i]) + 8);
      position[i] = i;
    }
    const uint64_t key = point_key(code, position);
    unsigned h = hash_slot(key);
    while (ob.hash_key[h] != 0) h = (h + 1) % kHashSlots;
    ob.hash_key[h] = key;
    ob.hash_index[h] = p;
  }
}

void build_tables(const float* patterns, const int64_t* parity, const float* res8, const int64_t* lookup,
                  Tables& tb) {
  tb.lookup = lookup;
  for (int p = 0; p < kPatterns; ++p) {
    tb.pattern_norm[p] = 0.0f;
    tb.parity[p] = static_cast<int>(parity[p]);
    for (int i = 0; i < kGroup; ++i) {
      tb.pattern[p][i] = tb.pattern_t[i][p] = patterns[p * kGroup + i];
      tb.res8[p][i] = res8[p * kGroup + i];
      tb.pattern_norm[p] += tb.pattern[p][i] * tb.pattern[p][i];
    }
  }
  build_orbits(tb.res8, tb.orbits);
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
