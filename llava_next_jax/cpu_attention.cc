// Attention over a prompt for XLA:CPU (the forward pass of a prefill, a forward or training pass, the
// vision tower) in one pass over tiles (flash attention): out[b, t, n] = softmax over
// the keys s that mask[b, t, s] allows of scale * q[b, t, n] . k[b, n / G, s], times v[b, n / G, s].
//
// XLA:CPU computes attention as separate operations: the logits of a block of queries are written to
// memory, read back for their maximum, again for the exponentials, and again by the product with the
// values. Here a task takes the G query heads of one kv head at a block of positions (kRows rows in
// all), walks the key tiles its mask reaches (tiles the mask hides entirely, e.g. above the causal
// diagonal, are skipped) and keeps the tile's logits, the running maxima and sums (online softmax)
// and the output in the core's caches. Products run on register tiles of kMicroRows x kColumns floats.
// Tasks go to XLA's thread pool, most work first. The forward pass also gives each query's log-sum-exp,
// from which the backward pass (below) recomputes the weights tile by tile for dq, dk and dv, so a
// training pass keeps no softmax weights either. A decode step's attention (a few new queries a row
// over the cache, whose keys are kept slots last) has a kernel of its own at the end. The vector code
// is GCC/Clang vector extensions, so it builds on any CPU the compiler targets (-march=native). Built
// and loaded by llava_next_jax/cpu_kernels.py with cpu_kernels.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_attention.h"
#include "cpu_products.h"
#include "cpu_tasks.h"

namespace ffi = xla::ffi;

namespace {

using llava_next::Exp;
using llava_next::HorizontalMax;
using llava_next::HorizontalSum;
using llava_next::kNegInf;
using llava_next::kShapeError;
using llava_next::kTile;
using llava_next::Mask;
using llava_next::Partial;
using llava_next::QueryIndex;
using llava_next::RowGroup;
using llava_next::RunTasks;
using llava_next::Shapes;
using llava_next::TileMask;

typedef float V8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));


inline V8 Load(const float* p) {
  V8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void Store(float* p, V8 v) { std::memcpy(p, &v, sizeof v); }
inline V8 Splat(float x) { return V8{x, x, x, x, x, x, x, x}; }
inline V8 Select(I8 keep, V8 x) { return (V8)((I8)x & keep); }  // x where keep, else 0
inline V8 Max(V8 a, V8 b) {
  const I8 greater = a > b;
  return (V8)(((I8)a & greater) | ((I8)b & ~greater));
}
// Row: a register tile's row of kColumns floats, two vector registers. With AVX-512 two of 16 floats
// (32 columns), else two of 8 (16 columns); either way a tile of kMicroRows = 6 rows keeps 12
// accumulators in registers and broadcasts each factor once for two of them. (A 64-byte vector type
// compiled for AVX2 ran the tiles 3.6x slower; with AVX-512, 12 rows x 16 columns, a load per
// multiply-add, measured no faster than 6 x 32.)
#ifdef __AVX512F__
typedef float V16 __attribute__((vector_size(64)));
typedef V16 Half;
constexpr int64_t kColumns = 32;
inline Half LoadHalf(const float* p) {
  Half v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void StoreHalf(float* p, Half v) { std::memcpy(p, &v, sizeof v); }
inline Half SplatHalf(float x) { return Half{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline Half Max(Half a, Half b) {
  typedef int32_t I16 __attribute__((vector_size(64)));
  const I16 greater = a > b;
  return (Half)(((I16)a & greater) | ((I16)b & ~greater));
}
#else
typedef V8 Half;
constexpr int64_t kColumns = 16;
inline Half LoadHalf(const float* p) { return Load(p); }
inline void StoreHalf(float* p, Half v) { Store(p, v); }
inline Half SplatHalf(float x) { return Splat(x); }
#endif
// A Half's worth of bfloat16 values (the high halves of float32s) widened to float32
inline Half LoadHalf(const uint16_t* p) {
  typedef uint16_t Halves __attribute__((vector_size(sizeof(Half) / 2)));
  typedef uint32_t Wide __attribute__((vector_size(sizeof(Half))));
  Halves halves;
  std::memcpy(&halves, p, sizeof halves);
  return (Half)(__builtin_convertvector(halves, Wide) << 16);
}
constexpr int64_t kHalf = kColumns / 2;
constexpr int kMicroRows = 6;
struct Row {
  Half low, high;
};
inline Row LoadRow(const float* p) { return {LoadHalf(p), LoadHalf(p + kHalf)}; }
inline void StoreRow(float* p, Row v) {
  StoreHalf(p, v.low);
  StoreHalf(p + kHalf, v.high);
}
inline Row& operator+=(Row& a, Row b) {
  a.low += b.low;
  a.high += b.high;
  return a;
}
inline Half Max(Row v) { return Max(v.low, v.high); }

// A register tile of kMicroRows x kColumns floats: acc[r] += sum over i < depth of a[r * a_stride + i] *
// b[i * b_stride + 0:kColumns] (each a[...] broadcast once for a row's two registers).
typedef Row Tile[kMicroRows];
inline void Accumulate(Tile& acc, const float* __restrict a, int64_t a_stride, const float* __restrict b,
                       int64_t b_stride, int64_t depth) {
  for (int64_t i = 0; i < depth; ++i) {
    const Row row = LoadRow(b + i * b_stride);
    for (int r = 0; r < kMicroRows; ++r) {
      const Half x = SplatHalf(a[r * a_stride + i]);
      acc[r].low += x * row.low;
      acc[r].high += x * row.high;
    }
  }
}

// The logits of a register tile: x[r, 0:kColumns] = q[r, :depth] . keys[:depth, 0:kColumns] (+ bias[r][0:kColumns]
// where bias is given), r < kMicroRows, with most[r] = max(most[r], x[r, 0:kColumns]). keys rows are kTile
// apart, q rows q_stride, x rows kTile.
inline void LogitsTile(const float* q, int64_t q_stride, const float* keys, int64_t depth, const float* const* bias,
                       float* __restrict x, Half* most) {
  Tile acc = {};
  Accumulate(acc, q, q_stride, keys, kTile, depth);
  for (int r = 0; r < kMicroRows; ++r) {
    if (bias) acc[r] += LoadRow(bias[r]);
    StoreRow(x + r * kTile, acc[r]);
    most[r] = Max(most[r], Max(acc[r]));
  }
}

// The output of a register tile: o[r, 0:kColumns] += sum over j < depth of w[r, j] * values[j, 0:kColumns],
// r < kMicroRows; w rows kTile apart, values and o rows `stride`.
inline void OutputTile(const float* w, const float* values, int64_t depth, int64_t stride, float* __restrict o) {
  Tile acc;
  for (int r = 0; r < kMicroRows; ++r) acc[r] = LoadRow(o + r * stride);
  Accumulate(acc, w, kTile, values, stride, depth);
  for (int r = 0; r < kMicroRows; ++r) StoreRow(o + r * stride, acc[r]);
}

// Keys and values of one (row, kv head, tile), packed: keys transposed [Hp, kTile], values [kTile, Hp],
// zero beyond the tile's keys and beyond H. The backward pass also packs the keys [kTile, Hp] and the
// values transposed [Hp, kTile] after them.
void PackTile(const Shapes& s, const float* k, const float* v, int64_t pair, int64_t tile, float* keys,
              float* values, bool backward = false) {
  const int64_t s0 = tile * kTile, width = std::min(kTile, s.S - s0);
  const float* kp = k + (pair * s.S + s0) * s.H;
  const float* vp = v + (pair * s.S + s0) * s.H;
  float* key_rows = values + kTile * s.Hp;
  float* values_t = key_rows + kTile * s.Hp;
  std::fill(keys, keys + s.Hp * kTile, 0.0f);
  std::fill(values, values + kTile * s.Hp * (backward ? 3 : 1), 0.0f);
  for (int64_t j = 0; j < width; ++j)
    for (int64_t d = 0; d < s.H; ++d) {
      keys[d * kTile + j] = kp[j * s.H + d];
      values[j * s.Hp + d] = vp[j * s.H + d];
      if (backward) {
        key_rows[j * s.Hp + d] = kp[j * s.H + d];
        values_t[d * kTile + j] = vp[j * s.H + d];
      }
    }
}

// One task: query positions [t0, t1) of row b, the G query heads of kv head kh. Row r of the task is
// position t0 + r / G, query head kh * G + r % G; rows go through each key tile kMicroRows at a time
// (logits, online softmax, output), so that their logits never leave the core's first-level cache.
void AttendBlock(const Shapes& s, const float* q, const Mask& mask, const float* packed, float scale, int64_t b,
                 int64_t kh, int64_t t0, int64_t t1, float* out, float* lse) {
  const int64_t G = s.G, H = s.H, Hp = s.Hp;
  const int64_t rows = (t1 - t0) * G;
  const int64_t padded_rows = (rows + kMicroRows - 1) / kMicroRows * kMicroRows;
  const int64_t tile_floats = 2 * Hp * kTile;
  // Queries times scale (zero beyond H and beyond the task's rows); outputs before the division by
  // the weights' sum; each row's largest logit so far and its weights' sum.
  std::vector<float> queries(padded_rows * Hp, 0.0f), acc(padded_rows * Hp, 0.0f);
  std::vector<float> bias((t1 - t0) * kTile), top(padded_rows, kNegInf), total(padded_rows, 0.0f);
  std::vector<int64_t> extent(t1 - t0);  // per position: its visible keys of the tile lie in [0, extent)
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = q + QueryIndex(s, b, kh, t0 * G + r) * H;
    for (int64_t d = 0; d < H; ++d) queries[r * Hp + d] = row[d] * scale;
  }
  alignas(32) float x[kMicroRows * kTile];
  for (int64_t tile = 0; tile < s.tiles; ++tile) {
    bool all;  // nothing here visible to any of the task's queries: skipped
    if (!TileMask(s, mask, b, t0, t1, tile, bias.data(), extent.data(), all)) continue;
    const float* keys = packed + ((b * s.K + kh) * s.tiles + tile) * tile_floats;
    const float* values = keys + Hp * kTile;
    for (int64_t r0 = 0; r0 < padded_rows; r0 += kMicroRows) {
      // Padded rows (zero queries) take the last row's mask; the keys any of the rows sees lie in
      // [0, depth): columns from `used` on are neither multiplied nor weighted (above a causal diagonal).
      const float* row_bias[kMicroRows];
      const int64_t depth = RowGroup(s, t0 * G + r0, t0, t0 * G + rows - 1, bias.data(), extent.data(), row_bias);
      if (depth == 0) continue;
      const int64_t used = (depth + kColumns - 1) / kColumns * kColumns;
      Half most[kMicroRows];
      for (int r = 0; r < kMicroRows; ++r) most[r] = SplatHalf(kNegInf);
      for (int64_t j = 0; j < used; j += kColumns) {
        const float* bias_at[kMicroRows];
        for (int r = 0; r < kMicroRows; ++r) bias_at[r] = row_bias[r] + j;
        LogitsTile(&queries[r0 * Hp], Hp, keys + j, H, all ? nullptr : bias_at, x + j, most);
      }
      for (int r = 0; r < kMicroRows; ++r) {
        float* xr = x + r * kTile;
        const float new_top = std::max(top[r0 + r], HorizontalMax(most[r]));
        if (new_top == kNegInf) {  // nothing visible to this row yet: no weights
          std::fill(xr, xr + used, 0.0f);
          continue;
        }
        Half sum{};
        for (int64_t j = 0; j < used; j += kHalf) {
          const Half w = Exp(LoadHalf(xr + j) - SplatHalf(new_top));
          StoreHalf(xr + j, w);
          sum += w;
        }
        const float rescale = std::exp(top[r0 + r] - new_top);  // 0 for the row's first visible tile
        total[r0 + r] = total[r0 + r] * rescale + HorizontalSum(sum);
        top[r0 + r] = new_top;
        if (rescale != 1.0f) {
          float* o = &acc[(r0 + r) * Hp];
          for (int64_t d = 0; d < Hp; d += kHalf) StoreHalf(o + d, LoadHalf(o + d) * SplatHalf(rescale));
        }
      }
      for (int64_t d = 0; d < Hp; d += kColumns) OutputTile(x, values + d, depth, Hp, &acc[r0 * Hp + d]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {  // a row that sees no key gets zeros (and a log-sum-exp of +inf)
    const float inverse = total[r] > 0.0f ? 1.0f / total[r] : 0.0f;
    const int64_t index = QueryIndex(s, b, kh, t0 * G + r);
    for (int64_t d = 0; d < H; ++d) out[index * H + d] = acc[r * Hp + d] * inverse;
    lse[index] = total[r] > 0.0f ? top[r] + std::log(total[r]) : -kNegInf;
  }
}

// q [B, T, N, H], k and v [B, K, S, H], mask [B, T, S] -> out [B, T, N, H] and each query's log-sum-exp
// of its scaled logits, lse [B, T, N] (+inf where it sees no key); N a multiple of K.
ffi::Error FlashAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                              ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                              ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, float scale) {
  Shapes s;
  if (!ReadShapes(q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions(), kMicroRows, kColumns, s))
    return ffi::Error::InvalidArgument(std::string("llava_next_flash_attention: ") + kShapeError);
  const float *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data();
  const bool* ms = mask.typed_data();
  float *os = out->typed_data(), *ls = lse->typed_data();
  llava_next::PackAndAttend<float>(
      pool, s, ms, 2 * s.Hp * kTile,
      [=](int64_t pair, int64_t tile, float* keys) { PackTile(s, ks, vs, pair, tile, keys, keys + s.Hp * kTile); },
      [=](const float* packed, const Mask& mask, int64_t b, int64_t kh, int64_t t0, int64_t t1) {
        AttendBlock(s, qs, mask, packed, scale, b, kh, t0, t1, os, ls);
      });
  return ffi::Error::Success();
}

// --- backward -------------------------------------------------------------------------------------
//
// With P the softmax weights (recomputed from the forward pass's log-sum-exp), D = rowsum(dO * O) and
// dS = P * (dO . v - D): dq = scale * dS k, dk = scale * dS^T q, dv = P^T dO. A task takes key tiles of
// one (row, kv head): each tile's dk and dv over the query rows that see it, kChunk rows at a time, and
// its share of those rows' dq.

constexpr int64_t kChunk = 48;                                         // query rows per dk/dv product
constexpr int64_t kTileRows = (kTile + kMicroRows - 1) / kMicroRows * kMicroRows;  // 66: whole tiles

// A (row, kv head)'s query rows r = t * G + g (position t, query head kh * G + g), packed [rows, Hp]:
// the queries times scale, the output gradients; with each row's log-sum-exp and D. Rows from T * G
// to `padded` are zero with a log-sum-exp of +inf (no weights).
struct Rows {
  int64_t padded;
  float *q, *dout, *lse, *delta;
};

void PackRows(const Shapes& s, const float* q, const float* dout, const float* lse, const float* delta,
              float scale, int64_t pair, const Rows& rows) {
  const int64_t b = pair / s.K, kh = pair % s.K, real = s.T * s.G;
  std::fill(rows.q, rows.q + rows.padded * s.Hp, 0.0f);
  std::fill(rows.dout, rows.dout + rows.padded * s.Hp, 0.0f);
  std::fill(rows.lse, rows.lse + rows.padded, -kNegInf);
  std::fill(rows.delta, rows.delta + rows.padded, 0.0f);
  for (int64_t r = 0; r < real; ++r) {
    const int64_t index = QueryIndex(s, b, kh, r);
    for (int64_t d = 0; d < s.H; ++d) {
      rows.q[r * s.Hp + d] = q[index * s.H + d] * scale;
      rows.dout[r * s.Hp + d] = dout[index * s.H + d];
    }
    rows.lse[r] = lse[index];
    rows.delta[r] = delta[index];
  }
}

// Rows [r0, r0 + kMicroRows) at one key tile, columns [0, used): x = P, y = dS (columns from used to
// kTile zero). bias: each row's mask bias for the tile, or null where the tile is all visible.
void GradientTile(const Shapes& s, const Rows& rows, int64_t r0, const float* packed_tile, const float* const* bias,
                  int64_t used, float* __restrict x, float* __restrict y) {
  const float* keys_t = packed_tile;
  const float* values_t = packed_tile + s.Hp * kTile + 2 * kTile * s.Hp;
  Half most[kMicroRows] = {};  // unused
  for (int64_t j = 0; j < used; j += kColumns) {
    const float* bias_at[kMicroRows];
    if (bias)
      for (int r = 0; r < kMicroRows; ++r) bias_at[r] = bias[r] + j;
    LogitsTile(rows.q + r0 * s.Hp, s.Hp, keys_t + j, s.H, bias ? bias_at : nullptr, x + j, most);
    LogitsTile(rows.dout + r0 * s.Hp, s.Hp, values_t + j, s.H, nullptr, y + j, most);
  }
  for (int r = 0; r < kMicroRows; ++r) {
    const Half lse = SplatHalf(rows.lse[r0 + r]), delta = SplatHalf(rows.delta[r0 + r]);
    float *xr = x + r * kTile, *yr = y + r * kTile;
    for (int64_t j = 0; j < used; j += kHalf) {
      const Half p = Exp(LoadHalf(xr + j) - lse);
      StoreHalf(xr + j, p);
      StoreHalf(yr + j, p * (LoadHalf(yr + j) - delta));
    }
    std::fill(xr + used, xr + kTile, 0.0f);
    std::fill(yr + used, yr + kTile, 0.0f);
  }
}

// acc[j, :] += sum over i < depth of a[j, i] * b[i, :] for the kTileRows x Hp accumulator acc; a rows
// kChunk apart, b rows Hp.
void AccumulateTile(const Shapes& s, const float* a, const float* b, int64_t depth, float* acc) {
  for (int64_t j0 = 0; j0 < kTileRows; j0 += kMicroRows)
    for (int64_t d = 0; d < s.Hp; d += kColumns) {
      Tile t;
      for (int r = 0; r < kMicroRows; ++r) t[r] = LoadRow(acc + (j0 + r) * s.Hp + d);
      Accumulate(t, a + j0 * kChunk, kChunk, b + d, s.Hp, depth);
      for (int r = 0; r < kMicroRows; ++r) StoreRow(acc + (j0 + r) * s.Hp + d, t[r]);
    }
}

// dk and dv of key tile `tile` of row b, kv head kh, over every query row that sees it, and that tile's
// share of those rows' dq / scale added to dq_part ([rows, Hp], the rows as packed).
void KeyGradients(const Shapes& s, const Rows& rows, const Mask& mask, const float* packed, int64_t b, int64_t kh,
                  int64_t tile, float* dk, float* dv, float* dq_part) {
  const int64_t G = s.G, Hp = s.Hp, real = s.T * G;
  const float* packed_tile = packed + ((b * s.K + kh) * s.tiles + tile) * 4 * Hp * kTile;
  const float* key_rows = packed_tile + 2 * Hp * kTile;
  std::vector<float> dk_acc(kTileRows * Hp, 0.0f), dv_acc(kTileRows * Hp, 0.0f);
  std::vector<float> p(kChunk * kTile), ds(kChunk * kTile);
  std::vector<float> p_t(kTileRows * kChunk, 0.0f), ds_t(kTileRows * kChunk, 0.0f);
  const int64_t max_positions = kChunk / G + 2;
  std::vector<float> bias(max_positions * kTile);
  std::vector<int64_t> extent(max_positions);
  for (int64_t c0 = 0; c0 < real; c0 += kChunk) {
    const int64_t n = std::min(kChunk, real - c0), t0 = c0 / G, t1 = (c0 + n - 1) / G + 1;
    bool all;
    if (!TileMask(s, mask, b, t0, t1, tile, bias.data(), extent.data(), all)) continue;
    for (int64_t r0 = c0; r0 < c0 + n; r0 += kMicroRows) {
      const float* row_bias[kMicroRows];
      const int64_t depth = RowGroup(s, r0, t0, c0 + n - 1, bias.data(), extent.data(), row_bias);
      float *x = &p[(r0 - c0) * kTile], *y = &ds[(r0 - c0) * kTile];
      if (depth == 0) {
        std::fill(x, x + kMicroRows * kTile, 0.0f);
        std::fill(y, y + kMicroRows * kTile, 0.0f);
        continue;
      }
      GradientTile(s, rows, r0, packed_tile, all ? nullptr : row_bias, (depth + kColumns - 1) / kColumns * kColumns, x, y);
      for (int64_t d = 0; d < Hp; d += kColumns) OutputTile(y, key_rows + d, depth, Hp, dq_part + r0 * Hp + d);
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < kTile; ++j) {
        p_t[j * kChunk + i] = p[i * kTile + j];
        ds_t[j * kChunk + i] = ds[i * kTile + j];
      }
    AccumulateTile(s, p_t.data(), rows.dout + c0 * Hp, n, dv_acc.data());
    AccumulateTile(s, ds_t.data(), rows.q + c0 * Hp, n, dk_acc.data());
  }
  const int64_t s0 = tile * kTile, width = std::min(kTile, s.S - s0);
  for (int64_t j = 0; j < width; ++j)
    for (int64_t d = 0; d < s.H; ++d) {
      const int64_t at = ((b * s.K + kh) * s.S + s0 + j) * s.H + d;
      dk[at] = dk_acc[j * Hp + d];
      dv[at] = dv_acc[j * Hp + d];
    }
}

// The gradients of FlashAttention: q, k, v, mask as it took them, dout [B, T, N, H], lse [B, T, N] (its
// second result), delta [B, T, N] = rowsum(dout * out) -> dq [B, T, N, H], dk and dv [B, K, S, H].
ffi::Error FlashAttentionBackwardImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                      ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                                      ffi::Buffer<ffi::F32> dout, ffi::Buffer<ffi::F32> lse,
                                      ffi::Buffer<ffi::F32> delta, ffi::ResultBuffer<ffi::F32> dq,
                                      ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv, float scale) {
  Shapes s;
  if (!ReadShapes(q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions(), kMicroRows, kColumns, s))
    return ffi::Error::InvalidArgument(std::string("llava_next_flash_attention_backward: ") + kShapeError);
  const int64_t pairs = s.B * s.K, tile_floats = 4 * s.Hp * kTile;
  const int64_t padded = (s.T * s.G + kChunk - 1) / kChunk * kChunk + kMicroRows;
  const int64_t row_floats = padded * (2 * s.Hp + 2);
  std::unique_ptr<float[]> packed(new float[pairs * s.tiles * tile_floats]);
  std::unique_ptr<float[]> packed_rows(new float[pairs * row_floats]);
  const float *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data(), *dos = dout.typed_data();
  const float *ls = lse.typed_data(), *ds = delta.typed_data();
  const bool* ms = mask.typed_data();
  float *pk = packed.get(), *pr = packed_rows.get();
  auto rows_of = [=](int64_t pair) {
    float* base = pr + pair * row_floats;
    return Rows{padded, base, base + padded * s.Hp, base + 2 * padded * s.Hp, base + 2 * padded * s.Hp + padded};
  };
  RunTasks(pool, pairs * s.tiles + pairs, [=](int64_t i) {
    if (i < pairs) return PackRows(s, qs, dos, ls, ds, scale, i, rows_of(i));
    const int64_t t = i - pairs;
    float* keys = pk + t * tile_floats;
    PackTile(s, ks, vs, t / s.tiles, t % s.tiles, keys, keys + s.Hp * kTile, true);
  });
  // The key tiles of a (row, kv head) go to `groups` tasks (tiles g, g + groups, ...), each adding its
  // tiles' shares of dq to a buffer of its own; the shares are summed after.
  const int64_t groups = std::clamp<int64_t>((2 * pool.num_threads() + pairs - 1) / pairs, 1, s.tiles);
  const int64_t part_floats = padded * s.Hp;
  std::unique_ptr<float[]> parts(new float[pairs * groups * part_floats]);
  float *dqs = dq->typed_data(), *dks = dk->typed_data(), *dvs = dv->typed_data(), *ps = parts.get();
  const std::vector<uint64_t> bits = llava_next::ReadMask(pool, s, ms);
  const Mask mask_tiles{bits.data()};
  RunTasks(pool, pairs * groups, [=](int64_t i) {
    const int64_t pair = i % pairs, group = i / pairs;
    float* part = ps + i * part_floats;
    std::fill(part, part + part_floats, 0.0f);
    for (int64_t tile = group; tile < s.tiles; tile += groups)
      KeyGradients(s, rows_of(pair), mask_tiles, pk, pair / s.K, pair % s.K, tile, dks, dvs, part);
  });
  RunTasks(pool, pairs, [=](int64_t pair) {
    const int64_t b = pair / s.K, kh = pair % s.K;
    for (int64_t r = 0; r < s.T * s.G; ++r) {
      float* out = dqs + QueryIndex(s, b, kh, r) * s.H;
      for (int64_t d = 0; d < s.H; ++d) {
        float sum = 0.0f;
        for (int64_t g = 0; g < groups; ++g) sum += ps[(g * pairs + pair) * part_floats + r * s.Hp + d];
        out[d] = sum * scale;
      }
    }
  });
  return ffi::Error::Success();
}


// --- decode ---------------------------------------------------------------------------------------
//
// A decode step's attention: the T new tokens of each row (one, or a prompt-lookup pass's token and
// drafts) over the cache as it was, keys and values [B, K, H, S] (slots last, as the cache is kept;
// float32, or bfloat16 or its bits as uint16, widened as it is read),
// where earlier [B, T, S] allows, and over the step's own keys and values [B, K, T, H] where own
// [B, T, T] allows; one softmax over both. A task takes a chunk of the slots some query of a (row, kv
// head) pair sees (a left-padded prompt's padding and the slots not yet written are not read): its
// T * G query rows' logits there, their weights and the weighted values, reading the chunk's keys
// and values once each, front to back (cpu_products.h's few-row products for the keys); a second
// task per pair joins its chunks' partial softmaxes with the step's own keys. Without the kernel,
// XLA:CPU wrote the logits and the weights to memory between its products over the cache.

// lanes whose mask byte (0 or 1) is 1: all bits set
inline I8 Allowed(const bool* m) {
  uint64_t word;
  std::memcpy(&word, m, sizeof word);
  I8 keep;
  for (int i = 0; i < 8; ++i) keep[i] = -int32_t((word >> (8 * i)) & 1);
  return keep;
}

// y[r * y_stride + n] = sum over j < length of x[r * x_stride + j] * w[n * w_stride + j] for r < Q <= 4
// and n < N: a decode step's output at N value dims from Q rows' weights x, dot products along the
// slots, kValueRows value rows at a time (Q x kValueRows accumulators of 16 running sums with AVX-512,
// else 8, kept in registers: more rows read at once stream faster). 16 instead of 8 on AVX-512: a bf16
// cache's batch-4 and 4-token passes ~5-12% faster, batch 1 and float32 within noise
// (benchmarks/decode_attention.py).
#ifdef __AVX512F__
constexpr int64_t kValueRows = 4;  // 32 vector registers
#else
constexpr int64_t kValueRows = 2;  // 16
#endif

template <int Q, typename C>
void WeightedValues(const float* __restrict x, int64_t x_stride, const C* __restrict w, int64_t w_stride,
                    int64_t length, int64_t N, float* __restrict y, int64_t y_stride) {
  constexpr int64_t W = sizeof(Half) / sizeof(float);  // floats a vector
  const int64_t LW = length / W * W;
  const auto finish = [&](const Half (&acc)[Q], int64_t n) {
    const C* __restrict wn = w + n * w_stride;
    for (int r = 0; r < Q; ++r) {
      float sum = HorizontalSum(acc[r]);
      for (int64_t j = LW; j < length; ++j) sum += x[r * x_stride + j] * llava_next::Widen(wn[j]);
      y[r * y_stride + n] = sum;
    }
  };
  int64_t n = 0;
  if constexpr (kValueRows == 4)
    for (; n + 4 <= N; n += 4) {
      const C* __restrict w0 = w + n * w_stride;
      const C* __restrict w1 = w0 + w_stride;
      const C* __restrict w2 = w1 + w_stride;
      const C* __restrict w3 = w2 + w_stride;
      Half a[Q], b[Q], c[Q], d[Q];
      for (int r = 0; r < Q; ++r) a[r] = b[r] = c[r] = d[r] = SplatHalf(0.0f);
      for (int64_t j = 0; j < LW; j += W) {
        const Half u = LoadHalf(w0 + j), v = LoadHalf(w1 + j), s = LoadHalf(w2 + j), t = LoadHalf(w3 + j);
        for (int r = 0; r < Q; ++r) {
          const Half p = LoadHalf(x + r * x_stride + j);
          a[r] += p * u;
          b[r] += p * v;
          c[r] += p * s;
          d[r] += p * t;
        }
      }
      finish(a, n);
      finish(b, n + 1);
      finish(c, n + 2);
      finish(d, n + 3);
    }
  for (; n + 2 <= N; n += 2) {
    const C* __restrict w0 = w + n * w_stride;
    const C* __restrict w1 = w0 + w_stride;
    Half a[Q], b[Q];
    for (int r = 0; r < Q; ++r) a[r] = b[r] = SplatHalf(0.0f);
    for (int64_t j = 0; j < LW; j += W) {
      const Half u = LoadHalf(w0 + j), v = LoadHalf(w1 + j);
      for (int r = 0; r < Q; ++r) {
        const Half p = LoadHalf(x + r * x_stride + j);
        a[r] += p * u;
        b[r] += p * v;
      }
    }
    finish(a, n);
    finish(b, n + 1);
  }
  for (; n < N; ++n) {
    const C* __restrict w0 = w + n * w_stride;
    Half a[Q];
    for (int r = 0; r < Q; ++r) a[r] = SplatHalf(0.0f);
    for (int64_t j = 0; j < LW; j += W)
      for (int r = 0; r < Q; ++r) a[r] += LoadHalf(x + r * x_stride + j) * LoadHalf(w0 + j);
    finish(a, n);
  }
}

template <typename C>
using WeightedFn = void (*)(const float*, int64_t, const C*, int64_t, int64_t, int64_t, float*, int64_t);
template <typename C>
constexpr WeightedFn<C> kWeighted[4] = {WeightedValues<1, C>, WeightedValues<2, C>, WeightedValues<3, C>,
                                        WeightedValues<4, C>};

// [lo, hi): the slots some query of row b sees (the left padding and the slots not yet written lie
// outside); lo = hi = 0 where none.
void SeenSlots(const Shapes& s, const bool* earlier, int64_t b, int64_t& lo, int64_t& hi) {
  lo = s.S, hi = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    const bool* m = earlier + (b * s.T + t) * s.S;
    int64_t first = 0, last = s.S;
    while (first < lo && !m[first]) ++first;
    while (last > std::max(hi, first) && !m[last - 1]) --last;
    if (first < last) lo = std::min(lo, first), hi = std::max(hi, last);
  }
  if (lo >= hi) lo = hi = 0;
}

// Each pair's query rows (row r: position r / G, query head kh * G + r % G) times scale, [B * K, R, H].
std::vector<float> ScaledQueries(const Shapes& s, const float* q, float scale) {
  const int64_t R = s.T * s.G;
  std::vector<float> queries(s.B * s.K * R * s.H);
  for (int64_t pair = 0; pair < s.B * s.K; ++pair)
    for (int64_t r = 0; r < R; ++r) {
      const float* row = q + QueryIndex(s, pair / s.K, pair % s.K, r) * s.H;
      float* to = &queries[(pair * R + r) * s.H];
      for (int64_t d = 0; d < s.H; ++d) to[d] = row[d] * scale;
    }
  return queries;
}

// One task: the slots [c0, c1) of a (row, kv head) pair for its R query rows (`queries`, scaled,
// [R, H]): each row's largest
// logit there (top, -inf where it sees none), its weights' sum relative to that (total) and their
// product with the values (acc [R, H]), for `DecodeCombine` to join with the other chunks'.
template <typename C>
void DecodeChunk(const Shapes& s, const float* queries, const C* k, const C* v, const bool* earlier, int64_t pair,
                 int64_t c0, int64_t c1, float* top, float* total, float* acc) {
  const int64_t b = pair / s.K, G = s.G, H = s.H, S = s.S, T = s.T, R = T * G;
  const C* keys = k + pair * H * S;
  const C* values = v + pair * H * S;
  std::unique_ptr<float[]> logits(new float[R * S]);  // [R, S], written in [c0, c1)
  Partial<C>(R, queries, keys, logits.get(), H, S, 0, H, c0, c1);
  for (int64_t r = 0; r < R; ++r) {  // the weights, in place of the logits
    const bool* m = earlier + (b * T + r / G) * S;
    float* x = &logits[r * S];
    int64_t j = c0;
    V8 most = Splat(kNegInf);
    float largest = kNegInf;
    for (; j + 8 <= c1; j += 8) {
      const I8 keep = Allowed(m + j);
      most = Max(most, (V8)(((I8)Load(x + j) & keep) | ((I8)Splat(kNegInf) & ~keep)));
    }
    for (; j < c1; ++j)
      if (m[j]) largest = std::max(largest, x[j]);
    top[r] = largest = std::max(largest, HorizontalMax(most));
    if (largest == kNegInf) largest = 0.0f;  // sees none here: every weight is 0 (masked below)
    V8 sum{};
    float rest = 0.0f;
    for (j = c0; j + 8 <= c1; j += 8) {
      const V8 weights = Select(Allowed(m + j), Exp(Load(x + j) - Splat(largest)));
      Store(x + j, weights);
      sum += weights;
    }
    for (; j < c1; ++j) rest += x[j] = m[j] ? std::exp(x[j] - largest) : 0.0f;
    total[r] = HorizontalSum(sum) + rest;
  }
  // rows in groups of 4 at kValueRows value dims, read from memory once for all groups
  for (int64_t n = 0; n < H; n += kValueRows)
    for (int64_t r0 = 0; r0 < R; r0 += 4)
      kWeighted<C>[std::min<int64_t>(R - r0, 4) - 1](&logits[r0 * S + c0], S, values + n * S + c0, S, c1 - c0,
                                                     std::min(H - n, kValueRows), &acc[r0 * H + n], H);
}

// A pair's output: its chunks' parts (top, total, acc of `chunks` tasks, `part` floats apart) and the
// step's own keys and values where own allows, one softmax: out[b, t, n] for its R rows.
void DecodeCombine(const Shapes& s, const float* queries, const float* k_new, const float* v_new, const bool* own,
                   int64_t pair, int64_t chunks, const float* parts, int64_t part, float* out) {
  const int64_t b = pair / s.K, kh = pair % s.K, G = s.G, H = s.H, T = s.T, R = T * G;
  const float* new_keys = k_new + pair * T * H;
  const float* new_values = v_new + pair * T * H;
  std::vector<float> own_logits(T), sum(H);
  for (int64_t r = 0; r < R; ++r) {
    const bool* mine = own + (b * T + r / G) * T;
    float top = kNegInf;
    for (int64_t u = 0; u < T; ++u) {
      float dot = 0.0f;
      for (int64_t d = 0; d < H; ++d) dot += queries[r * H + d] * new_keys[u * H + d];
      own_logits[u] = mine[u] ? dot : kNegInf;
      top = std::max(top, own_logits[u]);
    }
    for (int64_t c = 0; c < chunks; ++c) top = std::max(top, parts[c * part + r]);
    float* o = out + QueryIndex(s, b, kh, r) * H;
    if (top == kNegInf) {  // sees nothing: zeros
      std::fill(o, o + H, 0.0f);
      continue;
    }
    float total = 0.0f;
    std::fill(sum.begin(), sum.end(), 0.0f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* chunk = parts + c * part;
      if (chunk[r] == kNegInf) continue;
      const float rescale = std::exp(chunk[r] - top);
      total += chunk[R + r] * rescale;
      for (int64_t d = 0; d < H; ++d) sum[d] += chunk[2 * R + r * H + d] * rescale;
    }
    for (int64_t u = 0; u < T; ++u) {
      if (!mine[u]) continue;
      const float weight = std::exp(own_logits[u] - top);
      total += weight;
      for (int64_t d = 0; d < H; ++d) sum[d] += weight * new_values[u * H + d];
    }
    for (int64_t d = 0; d < H; ++d) o[d] = sum[d] / total;
  }
}

// Slots per chunk task at least: a chunk's partial results cost about as much to join as ~this many
// slots' work.
constexpr int64_t kMinChunk = 512;

// q [B, T, N, H], k and v [B, K, H, S], k_new and v_new [B, K, T, H], earlier [B, T, S], own [B, T, T]
// -> out [B, T, N, H]; N a multiple of K. Each pair's seen slots go in chunks to tasks (about four per
// thread in all, so that a thread of the pool that starts late leaves no thread with a long tail of
// work), then each pair's chunks are joined with its own keys.
ffi::Error DecodeAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                               ffi::Buffer<ffi::F32> k_new, ffi::Buffer<ffi::F32> v_new,
                               ffi::Buffer<ffi::PRED> earlier, ffi::Buffer<ffi::PRED> own,
                               ffi::ResultBuffer<ffi::F32> out, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions(), nd = k_new.dimensions(), ed = earlier.dimensions(),
       od = own.dimensions();
  const auto same = [](ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  };
  if (qd.size() != 4 || kd.size() != 4 || nd.size() != 4 || ed.size() != 3 || od.size() != 3 ||
      !same(kd, v.dimensions()) || !same(nd, v_new.dimensions()) || kd[0] != qd[0] || kd[1] < 1 ||
      qd[2] % kd[1] != 0 || kd[2] != qd[3] || nd[0] != qd[0] || nd[1] != kd[1] || nd[2] != qd[1] || nd[3] != qd[3] ||
      ed[0] != qd[0] || ed[1] != qd[1] || ed[2] != kd[3] || od[0] != qd[0] || od[1] != qd[1] || od[2] != qd[1])
    return ffi::Error::InvalidArgument(
        "llava_next_decode_attention: want q [B, T, N, H], k and v [B, K, H, S] (N a multiple of K), "
        "k_new and v_new [B, K, T, H], earlier [B, T, S], own [B, T, T]");
  const auto type = k.element_type();
  const bool bf16 = type == ffi::DataType::BF16 || type == ffi::DataType::U16;  // U16: bf16 bits
  if (type != v.element_type() || (!bf16 && type != ffi::DataType::F32))
    return ffi::Error::InvalidArgument(
        "llava_next_decode_attention: k and v must both be float32, bfloat16 or uint16 (bfloat16 bits)");
  const Shapes s{qd[0], qd[1], qd[2], qd[3], kd[1], kd[3], qd[2] / kd[1], 0, 0, 0};  // no prefill tiles
  const float *kn = k_new.typed_data(), *vn = v_new.typed_data();
  const void *ks = k.untyped_data(), *vs = v.untyped_data();
  const bool *es = earlier.typed_data(), *os = own.typed_data();
  float* result = out->typed_data();
  const int64_t pairs = s.B * s.K, R = s.T * s.G, part = R * (2 + s.H);
  std::vector<int64_t> lo(s.B), hi(s.B);
  int64_t widest = 0;
  for (int64_t b = 0; b < s.B; ++b) {
    SeenSlots(s, es, b, lo[b], hi[b]);
    widest = std::max(widest, hi[b] - lo[b]);
  }
  const int64_t wanted = (4 * pool.num_threads() + pairs - 1) / pairs;
  const int64_t chunks = std::max<int64_t>(1, std::min(wanted, widest / kMinChunk));
  std::unique_ptr<float[]> parts(new float[pairs * chunks * part]);  // per pair, its chunks' parts
  const std::vector<float> queries = ScaledQueries(s, q.typed_data(), scale);  // once, for every task of a pair
  float* ps = parts.get();
  const float* qs = queries.data();
  const int64_t *los = lo.data(), *his = hi.data();
  RunTasks(pool, pairs * chunks, [=](int64_t i) {
    const int64_t pair = i / chunks, c = i % chunks, b = pair / s.K, width = his[b] - los[b];
    const auto bound = [&](int64_t c) { return c == chunks ? his[b] : los[b] + width * c / chunks / 8 * 8; };
    const int64_t c0 = bound(c), c1 = bound(c + 1);
    float* at = ps + i * part;
    const float* pq = qs + pair * R * s.H;
    std::fill(at, at + R, kNegInf);         // top: none seen
    std::fill(at + R, at + part, 0.0f);     // total, acc
    if (c0 < c1 && bf16)
      DecodeChunk(s, pq, static_cast<const uint16_t*>(ks), static_cast<const uint16_t*>(vs), es, pair, c0, c1, at,
                  at + R, at + 2 * R);
    else if (c0 < c1)
      DecodeChunk(s, pq, static_cast<const float*>(ks), static_cast<const float*>(vs), es, pair, c0, c1, at, at + R,
                  at + 2 * R);
  });
  RunTasks(pool, pairs, [=](int64_t pair) {
    DecodeCombine(s, qs + pair * R * s.H, kn, vn, os, pair, chunks, ps + pair * chunks * part, part, result);
  });
  return ffi::Error::Success();
}

}  // namespace

// The arguments both handlers start with: XLA's thread pool, q, k, v (float32) and the bool mask.
inline auto AttentionArguments() {
  using F32 = ffi::Buffer<ffi::F32>;
  return ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<F32>().Arg<F32>().Arg<F32>().Arg<ffi::Buffer<ffi::PRED>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashAttention, FlashAttentionImpl,
                              AttentionArguments()
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out
                                  .Ret<ffi::Buffer<ffi::F32>>()    // lse
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashAttentionBackward, FlashAttentionBackwardImpl,
                              AttentionArguments()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // dout
                                  .Arg<ffi::Buffer<ffi::F32>>()    // lse
                                  .Arg<ffi::Buffer<ffi::F32>>()    // delta
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dq
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dk
                                  .Ret<ffi::Buffer<ffi::F32>>()    // dv
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DecodeAttention, DecodeAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()    // q
                                  .Arg<ffi::AnyBuffer>()           // k: float32, bfloat16 or its bits (uint16)
                                  .Arg<ffi::AnyBuffer>()           // v: as k
                                  .Arg<ffi::Buffer<ffi::F32>>()    // k_new
                                  .Arg<ffi::Buffer<ffi::F32>>()    // v_new
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // earlier
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // own
                                  .Ret<ffi::Buffer<ffi::F32>>()    // out
                                  .Attr<float>("scale"));
