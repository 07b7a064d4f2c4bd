// A few rows times a large matrix streamed from memory, shared by the native kernels: the few-row
// matmul (cpu_kernels.cc) and a decode step's query logits over the cached keys (cpu_attention.cc).
// Plain C++ loops that the compiler vectorises (-O3 -march=native).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace llava_next {

inline float Widen(float v) { return v; }
inline float Widen(uint16_t bf16) {  // bfloat16 is the high half of a float32
  const uint32_t bits = uint32_t(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// y[:Q, c0:c1] += x[:Q, k:k+4] @ w[k:k+4, c0:c1] for Q <= 4 rows; x is [., K], w [K, N] and y [., N],
// row-major. The rows' 16 factors, the 4 weights and an accumulator fit the vector registers, so the
// compiler vectorises the column loop (with more rows it spilled and ran ~8x slower). With kPrefetch (up
// to four rows: more are limited by their arithmetic, and ran slower with it) the next four weight rows'
// cache line at each column is requested meanwhile, a line at a time: the weights then streamed from
// memory up to 1.5x faster (bf16, 1024 columns; docs/benchmarks.md).
template <int Q, typename W, bool kPrefetch>
inline void FourRows(const float* __restrict x, const W* __restrict w, float* __restrict y, int64_t K,
                     int64_t N, int64_t k, int64_t c0, int64_t c1) {
  const W* __restrict w0 = w + k * N;
  const W* __restrict w1 = w0 + N;
  const W* __restrict w2 = w1 + N;
  const W* __restrict w3 = w2 + N;
  float a[Q], b[Q], c[Q], d[Q];
  for (int r = 0; r < Q; ++r) {
    a[r] = x[r * K + k];
    b[r] = x[r * K + k + 1];
    c[r] = x[r * K + k + 2];
    d[r] = x[r * K + k + 3];
  }
  const auto columns = [&](int64_t from, int64_t to) {
    for (int64_t n = from; n < to; ++n) {
      const float u = Widen(w0[n]), v = Widen(w1[n]), s = Widen(w2[n]), t = Widen(w3[n]);
      for (int r = 0; r < Q; ++r) y[r * N + n] += (a[r] * u + b[r] * v) + (c[r] * s + d[r] * t);
    }
  };
  if constexpr (kPrefetch) {
    constexpr int64_t kLine = 64 / sizeof(W);  // weights a cache line holds
    for (int64_t l0 = c0; l0 < c1; l0 += kLine) {
      for (const W* row : {w0, w1, w2, w3}) __builtin_prefetch(row + 4 * N + l0);
      columns(l0, std::min(c1, l0 + kLine));
    }
  } else {
    columns(c0, c1);
  }
}

// y[:, n0:n1] = x[:, k0:k1] @ w[k0:k1, n0:n1] for R rows; x is [R, K], w [K, N] and y [R, N],
// row-major. The weights are read front to back, four rows at a time; more than four rows of x take
// them in groups of four over column chunks of kChunk, so a chunk read from memory once is re-read
// from L1.
constexpr int64_t kChunk = 512;

template <typename W>
void Partial(int64_t R, const float* __restrict x, const void* weights, float* __restrict y, int64_t K, int64_t N,
             int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  const W* __restrict w = static_cast<const W*>(weights);
  for (int64_t r = 0; r < R; ++r) std::fill(y + r * N + n0, y + r * N + n1, 0.0f);
  const int64_t chunk = R <= 4 ? n1 - n0 : kChunk;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
      const int64_t c1 = std::min(n1, c0 + chunk);
      for (int64_t r0 = 0; r0 < R; r0 += 4) {
        const float* xr = x + r0 * K;
        float* yr = y + r0 * N;
        switch (std::min<int64_t>(R - r0, 4) + (R <= 4 ? 0 : 4)) {  // up to four rows prefetch
          case 1: FourRows<1, W, true>(xr, w, yr, K, N, k, c0, c1); break;
          case 2: FourRows<2, W, true>(xr, w, yr, K, N, k, c0, c1); break;
          case 3: FourRows<3, W, true>(xr, w, yr, K, N, k, c0, c1); break;
          case 4: FourRows<4, W, true>(xr, w, yr, K, N, k, c0, c1); break;
          case 5: FourRows<1, W, false>(xr, w, yr, K, N, k, c0, c1); break;
          case 6: FourRows<2, W, false>(xr, w, yr, K, N, k, c0, c1); break;
          case 7: FourRows<3, W, false>(xr, w, yr, K, N, k, c0, c1); break;
          default: FourRows<4, W, false>(xr, w, yr, K, N, k, c0, c1);
        }
      }
    }
  }
  for (; k < k1; ++k) {
    const W* __restrict w0 = w + k * N;
    for (int64_t r = 0; r < R; ++r) {
      const float a = x[r * K + k];
      for (int64_t n = n0; n < n1; ++n) y[r * N + n] += a * Widen(w0[n]);
    }
  }
}

}  // namespace llava_next
