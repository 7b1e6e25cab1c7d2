// Decoding one E8P codeword (layout: nexusquant_vllm/codec/e8.py) from its pattern row and small tables that stay in
// L1 (the 2 MiB expanded codebook does not); both CPU kernels use it.
#pragma once

#include <cstdint>

#include "simd.h"

namespace nq {

// Sign handling of E8P as one small table: per (pattern parity, 7 sign bits), the XOR mask that flips the float
// signs of those lanes and of lane 7, whose sign makes the number of negative signs match the pattern's parity.
struct E8PSigns {
  int32_t flip[2][128][8];
  v8f shift[2];  // +1/4 and -1/4 in every lane: the index's bit 15

  E8PSigns() {
    for (int parity = 0; parity < 2; ++parity) {
      for (int s = 0; s < 128; ++s) {
        const int signs = s | ((__builtin_parity(s) ^ parity) << 7);
        for (int i = 0; i < 8; ++i) flip[parity][s][i] = (signs >> i) & 1 ? static_cast<int32_t>(0x80000000u) : 0;
      }
    }
    shift[0] = v8f{} + 0.25f;
    shift[1] = v8f{} - 0.25f;
  }
};
inline const E8PSigns kE8PSigns;

// The E8P point of a 16-bit index whose pattern (bits 0-7) has the absolute values `pattern` [8] and sign parity
// `parity`: 7 sign bits + the parity-fixed 8th, shift +-1/4. Bit-identical to the codec's expanded table.
NQ_INLINE v8f e8p_point(const float* pattern, int parity, uint32_t index) {
  const v8i bits = *reinterpret_cast<const v8i_unaligned*>(pattern) ^
                   *reinterpret_cast<const v8i_unaligned*>(kE8PSigns.flip[parity][(index >> 8) & 0x7Fu]);
  return reinterpret_cast<v8f>(bits) + kE8PSigns.shift[index >> 15 & 1];
}

}  // namespace nq
