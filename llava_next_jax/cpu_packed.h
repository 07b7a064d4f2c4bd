// Packed bfloat16 weight kernels: 12 bits a weight instead of 16, lossless. A decode step streams its
// weights from memory and spends its time there (docs/benchmarks.md), so a quarter fewer bytes is a
// quarter less time for the products. Layout of a kernel w [K, N] (packed_weights.py builds it):
//
// - low [K, Np] uint8, Np = N rounded up to a multiple of 32: the low byte of each weight's bits (the
//   exponent's last bit and the 7 mantissa bits); the padding columns 0.
// - codes [K, Np / 2] uint8: a 4-bit code per weight for its high byte (the sign and the exponent's 7
//   high bits), through `table` [16]. Columns in blocks of 32: byte 16 b + i of a row holds the code
//   of column 32 b + i in its low nibble and that of column 32 b + 16 + i in its high nibble, so 16
//   bytes give two runs of 16 columns.
// - table [16] uint8: the 15 high bytes most frequent in the kernel; code 15 is an escape (table[15]
//   and the escape's low byte 0).
// - escapes: the weights whose high byte has no code, as (row, column, value), sorted by the group of
//   four rows (row / 4), then column, then row; `escape_groups` [ceil(K / 4) + 1]: where each group's
//   escapes start. A product puts them in place of the decoded weights of their 32-column block, so
//   it computes exactly what the few-row product (cpu_products.h) computes on the bf16 kernel.
//
// Weights of a trained or random kernel take a handful of exponents (their magnitudes span a few
// octaves), so escapes are rare: ~1e-4 of a random normal kernel's.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include <immintrin.h>

#include "xla/ffi/api/ffi.h"

namespace llava_next {

struct Packed {
  const uint8_t* low;
  const uint8_t* codes;
  const uint8_t* table;
  const int32_t* escape_rows;
  const int32_t* escape_columns;
  const float* escape_values;
  const int32_t* escape_groups;
  int64_t escapes;
  int64_t K, Np;  // Np: the padded columns, a multiple of kPackBlock
};

constexpr int64_t kPackBlock = 32;

typedef uint8_t Bytes16 __attribute__((vector_size(16)));
typedef uint32_t Words16 __attribute__((vector_size(64)));
typedef float Floats16 __attribute__((vector_size(64)));

// 16 weights as float32 bit patterns: `codes`' 16 low nibbles (or high ones: `upper`) through the
// table for the high bytes (one byte shuffle), `low`'s 16 bytes beside them. Without AVX2, a loop.
inline Words16 Unpack16(Bytes16 table, const uint8_t* codes, const uint8_t* low, bool upper) {
#ifdef __AVX2__
  __m128i nibbles = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  nibbles = _mm_and_si128(upper ? _mm_srli_epi16(nibbles, 4) : nibbles, _mm_set1_epi8(15));
  const __m128i high = _mm_shuffle_epi8(reinterpret_cast<__m128i>(table), nibbles);
  const __m128i lows = _mm_loadu_si128(reinterpret_cast<const __m128i*>(low));
#if defined(__AVX512VBMI__)
  // bytes 4i + 2 and 4i + 3 of the result from low[i] and high[i], the others 0: one permute
  const __m512i index = _mm512_set1_epi32(0x10000000) + _mm512_set_epi32(
      0x0f0f0000, 0x0e0e0000, 0x0d0d0000, 0x0c0c0000, 0x0b0b0000, 0x0a0a0000, 0x09090000, 0x08080000,
      0x07070000, 0x06060000, 0x05050000, 0x04040000, 0x03030000, 0x02020000, 0x01010000, 0x00000000);
  const __m512i both = _mm512_castsi256_si512(_mm256_set_m128i(high, lows));
  return reinterpret_cast<Words16>(_mm512_maskz_permutexvar_epi8(0xCCCCCCCCCCCCCCCCull, index, both));
#elif defined(__AVX512F__)
  return reinterpret_cast<Words16>(_mm512_or_si512(_mm512_slli_epi32(_mm512_cvtepu8_epi32(high), 24),
                                                   _mm512_slli_epi32(_mm512_cvtepu8_epi32(lows), 16)));
#else
  const auto half = [](__m128i h, __m128i l) {
    return _mm256_or_si256(_mm256_slli_epi32(_mm256_cvtepu8_epi32(h), 24),
                           _mm256_slli_epi32(_mm256_cvtepu8_epi32(l), 16));
  };
  const __m256i parts[2] = {half(high, lows), half(_mm_srli_si128(high, 8), _mm_srli_si128(lows, 8))};
  Words16 bits;
  std::memcpy(&bits, parts, sizeof bits);
  return bits;
#endif
#else
  Words16 bits;
  for (int i = 0; i < 16; ++i) {
    const int code = (upper ? codes[i] >> 4 : codes[i]) & 15;
    bits[i] = uint32_t(table[code]) << 24 | uint32_t(low[i]) << 16;
  }
  return bits;
#endif
}

inline Floats16 Float16(Words16 bits) {
  Floats16 f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline Bytes16 Table(const Packed& p) {
  Bytes16 table;
  std::memcpy(&table, p.table, 16);
  return table;
}

// The 16 weights of row k, columns [n, n + 16) (n a multiple of 16).
inline Words16 Unpack16(const Packed& p, Bytes16 table, int64_t k, int64_t n) {
  return Unpack16(table, p.codes + k * (p.Np / 2) + n / kPackBlock * 16, p.low + k * p.Np + n, n % kPackBlock);
}

inline Floats16 Load16(const float* from) {
  Floats16 v;
  std::memcpy(&v, from, sizeof v);
  return v;
}

inline void Store16(float* to, Floats16 v) { std::memcpy(to, &v, sizeof v); }

// The weights of rows k..k+3 (`rows` of them), columns [n, n + 32) into w, with the escapes among them
// from e on (their group's, in column order) put in place; e moves past them.
inline void UnpackBlock(const Packed& p, Bytes16 table, int64_t k, int rows, int64_t n, int64_t& e, int64_t end,
                        float (*w)[kPackBlock]) {
  for (int j = 0; j < rows; ++j) {
    Store16(w[j], Float16(Unpack16(p, table, k + j, n)));
    Store16(w[j] + 16, Float16(Unpack16(p, table, k + j, n + 16)));
  }
  for (; e < end && p.escape_columns[e] < n + kPackBlock; ++e)
    if (p.escape_rows[e] - k < rows) w[p.escape_rows[e] - k][p.escape_columns[e] - n] = p.escape_values[e];
}

// y[:Q, c0:c1] += x[:Q, k:k+4] @ w[k:k+4, c0:c1] for Q <= 4 rows, k a multiple of 4, c0 and c1 multiples of
// kPackBlock; y is [., Np]. The next four weight rows' lines are requested at each 64 columns. The sums as
// cpu_products.h's FourRows forms them.
template <int Q>
inline void PackedFourRows(const float* __restrict x, const Packed& p, Bytes16 table, float* __restrict y,
                           int64_t k, int64_t c0, int64_t c1) {
  const int64_t K = p.K, Np = p.Np;
  const uint8_t* __restrict low = p.low + k * Np;
  const uint8_t* __restrict codes = p.codes + k * (Np / 2);
  float a[Q], b[Q], c[Q], d[Q];
  for (int r = 0; r < Q; ++r) {
    a[r] = x[r * K + k];
    b[r] = x[r * K + k + 1];
    c[r] = x[r * K + k + 2];
    d[r] = x[r * K + k + 3];
  }
  const auto add = [&](int64_t n, Floats16 u, Floats16 v, Floats16 s, Floats16 t) {
    for (int r = 0; r < Q; ++r) {
      float* out = y + r * Np + n;
      Store16(out, Load16(out) + ((a[r] * u + b[r] * v) + (c[r] * s + d[r] * t)));
    }
  };
  int64_t e = p.escape_groups[k / 4];
  const int64_t end = p.escape_groups[k / 4 + 1];
  while (e < end && p.escape_columns[e] < c0) ++e;
  for (int64_t n = c0; n < c1; n += kPackBlock) {
    if (n % 64 == 0)
      for (int j = 4; j < 8; ++j) {
        __builtin_prefetch(low + j * Np + n);
        __builtin_prefetch(codes + j * (Np / 2) + n / 2);
      }
    if (e < end && p.escape_columns[e] < n + kPackBlock) {  // rare: ~1 block in 40 of a random kernel's
      float w[4][kPackBlock];
      UnpackBlock(p, table, k, 4, n, e, end, w);
      for (int h = 0; h < 2; ++h)
        add(n + 16 * h, Load16(w[0] + 16 * h), Load16(w[1] + 16 * h), Load16(w[2] + 16 * h), Load16(w[3] + 16 * h));
      continue;
    }
    for (int upper = 0; upper < 2; ++upper) {
      const auto weights = [&](int j) {
        return Float16(Unpack16(table, codes + j * (Np / 2) + n / 2, low + j * Np + n + 16 * upper, upper));
      };
      add(n + 16 * upper, weights(0), weights(1), weights(2), weights(3));
    }
  }
}

// y[:, n0:n1] = x[:, k0:k1] @ w[k0:k1, n0:n1] for R <= 8 rows, k0 a multiple of 4, n0 and n1 multiples of
// kPackBlock; x is [R, K], y [R, Np] (its padding columns are written too). Four weight rows at a time
// front to back, in groups of four rows of x; the rows past the last four one at a time.
inline void PackedPartial(int64_t R, const float* __restrict x, const Packed& p, float* __restrict y, int64_t k0,
                          int64_t k1, int64_t n0, int64_t n1) {
  const int64_t K = p.K, Np = p.Np;
  const Bytes16 table = Table(p);
  for (int64_t r = 0; r < R; ++r) std::fill(y + r * Np + n0, y + r * Np + n1, 0.0f);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4)
    for (int64_t r0 = 0; r0 < R; r0 += 4) {
      const float* xr = x + r0 * K;
      float* yr = y + r0 * Np;
      switch (std::min<int64_t>(R - r0, 4)) {
        case 1: PackedFourRows<1>(xr, p, table, yr, k, n0, n1); break;
        case 2: PackedFourRows<2>(xr, p, table, yr, k, n0, n1); break;
        case 3: PackedFourRows<3>(xr, p, table, yr, k, n0, n1); break;
        default: PackedFourRows<4>(xr, p, table, yr, k, n0, n1);
      }
    }
  if (k == k1) return;
  int64_t e = p.escape_groups[k / 4];
  const int64_t end = p.escape_groups[k / 4 + 1];
  while (e < end && p.escape_columns[e] < n0) ++e;
  for (int64_t n = n0; n < n1; n += kPackBlock) {
    float w[4][kPackBlock];
    UnpackBlock(p, table, k, int(k1 - k), n, e, end, w);
    for (int64_t j = 0; j < k1 - k; ++j)
      for (int64_t r = 0; r < R; ++r)
        for (int h = 0; h < 2; ++h) {
          float* out = y + r * Np + n + 16 * h;
          Store16(out, Load16(out) + x[r * K + k + j] * Load16(w[j] + 16 * h));
        }
  }
}

// Rows [k0, k1) of w as bfloat16 bits into out [K, N] (row-major, N <= Np), escapes included.
inline void UnpackRows(const Packed& p, uint16_t* __restrict out, int64_t N, int64_t k0, int64_t k1) {
  const Bytes16 table = Table(p);
  for (int64_t k = k0; k < k1; ++k) {
    uint16_t* row = out + k * N;
    for (int64_t n = 0; n < N; n += 16) {
      const Words16 bits = Unpack16(p, table, k, n) >> 16;
      if (n + 16 <= N) {
        for (int i = 0; i < 16; ++i) row[n + i] = uint16_t(bits[i]);
      } else {
        for (int64_t i = 0; i < N - n; ++i) row[n + i] = uint16_t(bits[i]);
      }
    }
  }
  for (int64_t e = 0; e < p.escapes; ++e) {
    const int64_t row = p.escape_rows[e];
    if (row < k0 || row >= k1) continue;
    uint32_t bits;
    std::memcpy(&bits, p.escape_values + e, sizeof bits);
    out[row * N + p.escape_columns[e]] = uint16_t(bits >> 16);
  }
}

// Packs w [K, N] (bf16 bits) into low, codes and table (sized as above) and the escapes (up to
// max_escapes of them; groups [ceil(K / 4) + 1]). Returns how many escapes, or -1 past max_escapes.
inline int64_t Pack(const uint16_t* w, int64_t K, int64_t N, uint8_t* low, uint8_t* codes, uint8_t* table,
                    int64_t max_escapes, int32_t* escape_rows, int32_t* escape_columns, float* escape_values,
                    int32_t* groups) {
  const int64_t Np = (N + kPackBlock - 1) / kPackBlock * kPackBlock;
  int64_t counts[256] = {};
  for (int64_t i = 0; i < K * N; ++i) ++counts[w[i] >> 8];
  int order[256];
  for (int i = 0; i < 256; ++i) order[i] = i;
  std::stable_sort(order, order + 256, [&](int a, int b) { return counts[a] > counts[b]; });
  uint8_t code_of[256];
  std::fill(code_of, code_of + 256, uint8_t(15));
  std::fill(table, table + 16, uint8_t(0));
  for (int c = 0; c < 15 && counts[order[c]] > 0; ++c) {
    code_of[order[c]] = uint8_t(c);
    table[c] = uint8_t(order[c]);
  }
  int64_t escapes = 0;
  std::vector<std::pair<int32_t, int32_t>> found;  // a group's escapes as (column, row)
  for (int64_t k0 = 0; k0 < K; k0 += 4) {
    groups[k0 / 4] = int32_t(escapes);
    found.clear();
    for (int64_t k = k0; k < std::min(K, k0 + 4); ++k) {
      const uint16_t* row = w + k * N;
      uint8_t* row_low = low + k * Np;
      uint8_t* row_codes = codes + k * (Np / 2);
      for (int64_t n = 0; n < Np; ++n) {
        const uint8_t code = n < N ? code_of[row[n] >> 8] : 15;   // the padding: escapes' code, low byte 0
        row_low[n] = code == 15 ? 0 : uint8_t(row[n]);
        uint8_t& byte = row_codes[n / kPackBlock * 16 + n % 16];
        byte = n % kPackBlock < 16 ? code : uint8_t(byte | code << 4);
        if (code == 15 && n < N) found.emplace_back(int32_t(n), int32_t(k));
      }
    }
    if (escapes + int64_t(found.size()) > max_escapes) return -1;
    std::sort(found.begin(), found.end());
    for (auto [n, k] : found) {
      const uint32_t wide = uint32_t(w[k * N + n]) << 16;
      escape_rows[escapes] = k;
      escape_columns[escapes] = n;
      std::memcpy(escape_values + escapes, &wide, sizeof wide);
      ++escapes;
    }
  }
  groups[(K + 3) / 4] = int32_t(escapes);
  return escapes;
}

// The packed kernel in an FFI call's arguments (`cpu_kernels.packed_matmul`'s order), N its columns;
// an error naming what is wrong with them.
inline xla::ffi::Error PackedView(xla::ffi::AnyBuffer low, xla::ffi::AnyBuffer codes, xla::ffi::AnyBuffer table,
                                  xla::ffi::AnyBuffer rows, xla::ffi::AnyBuffer columns, xla::ffi::AnyBuffer values,
                                  xla::ffi::AnyBuffer groups, int64_t N, Packed* p) {
  using xla::ffi::DataType;
  auto ld = low.dimensions(), cd = codes.dimensions();
  const int64_t escapes = rows.element_count();
  if (ld.size() != 2 || cd.size() != 2 || cd[0] != ld[0] || ld[1] % kPackBlock || cd[1] * 2 != ld[1] || N > ld[1] ||
      N <= ld[1] - kPackBlock || table.element_count() != 16 || columns.element_count() != escapes ||
      values.element_count() != escapes || groups.element_count() != (ld[0] + 3) / 4 + 1 ||
      low.element_type() != DataType::U8 || codes.element_type() != DataType::U8 ||
      table.element_type() != DataType::U8 || rows.element_type() != DataType::S32 ||
      columns.element_type() != DataType::S32 || values.element_type() != DataType::F32 ||
      groups.element_type() != DataType::S32)
    return xla::ffi::Error::InvalidArgument(
        "llava_next packed kernel: want low u8 [K, Np], codes u8 [K, Np / 2], table u8 [16], escapes (s32, s32, "
        "f32) [E], escape groups s32 [ceil(K / 4) + 1], Np the columns rounded up to 32");
  *p = {static_cast<const uint8_t*>(low.untyped_data()), static_cast<const uint8_t*>(codes.untyped_data()),
        static_cast<const uint8_t*>(table.untyped_data()), static_cast<const int32_t*>(rows.untyped_data()),
        static_cast<const int32_t*>(columns.untyped_data()), static_cast<const float*>(values.untyped_data()),
        static_cast<const int32_t*>(groups.untyped_data()), escapes, ld[0], ld[1]};
  return xla::ffi::Error::Success();
}

}  // namespace llava_next
