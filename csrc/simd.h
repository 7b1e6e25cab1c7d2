// 8-lane float/int vectors (GCC vector extensions: AVX2 in the AVX2 clones, SSE pairs otherwise) and the helpers
// both CPU kernels use.
#pragma once

#include <cstdint>

#define NQ_INLINE inline __attribute__((always_inline))

namespace nq {

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
// Unaligned views for loads and stores; typed (not memcpy) so that stores into arrays of other types cannot alias
// the pointers the loops read, which the compiler can then keep in registers.
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i_unaligned __attribute__((vector_size(32), aligned(4)));

NQ_INLINE v8f load8(const float* p) { return *reinterpret_cast<const v8f_unaligned*>(p); }

NQ_INLINE void store8(float* p, v8f v) { *reinterpret_cast<v8f_unaligned*>(p) = v; }

// Lane t of the result is op folded over the 8 lanes of v[t] (a transposing reduction: 7 ops for 8 reductions).
template <class Op>
NQ_INLINE v8f reduce8(const v8f* v, Op op) {
  const v8i even = {0, 8, 2, 10, 4, 12, 6, 14}, odd = {1, 9, 3, 11, 5, 13, 7, 15};
  const v8i lo2 = {0, 1, 8, 9, 4, 5, 12, 13}, hi2 = {2, 3, 10, 11, 6, 7, 14, 15};
  const v8i lo4 = {0, 1, 2, 3, 8, 9, 10, 11}, hi4 = {4, 5, 6, 7, 12, 13, 14, 15};
  v8f x[4], y[2];
  for (int i = 0; i < 4; ++i) x[i] = op(__builtin_shuffle(v[2 * i], v[2 * i + 1], even), __builtin_shuffle(v[2 * i], v[2 * i + 1], odd));
  for (int i = 0; i < 2; ++i) y[i] = op(__builtin_shuffle(x[2 * i], x[2 * i + 1], lo2), __builtin_shuffle(x[2 * i], x[2 * i + 1], hi2));
  return op(__builtin_shuffle(y[0], y[1], lo4), __builtin_shuffle(y[0], y[1], hi4));
}

}  // namespace nq
