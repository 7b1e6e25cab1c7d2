// The codec's rotation (nexusquant_vllm/codec/rotation.py) on one vector, in place: x @ R with
// R = block_diag(H_b / sqrt(b)) over power-of-two blocks b, largest first, that add up to d. Each normalized Sylvester
// Hadamard block is symmetric and its own inverse, so the same call also un-rotates (y @ R^T).
#pragma once

#include <cmath>
#include <cstdint>

namespace nq {

inline void hadamard_rotate(float* x, int64_t d) {
  for (int64_t start = 0; start < d;) {
    int64_t b = 1;
    while (b * 2 <= d - start) b *= 2;
    float* block = x + start;
    for (int64_t h = 1; h < b; h *= 2) {
      for (int64_t i = 0; i < b; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          const float a = block[j], c = block[j + h];
          block[j] = a + c;
          block[j + h] = a - c;
        }
      }
    }
    const float norm = 1.0f / std::sqrt(static_cast<float>(b));
    for (int64_t i = 0; i < b; ++i) block[i] *= norm;
    start += b;
  }
}

}  // namespace nq
