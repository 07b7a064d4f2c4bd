// What the attention kernels over a prompt share (cpu_attention.cc: float32 on vector registers;
// cpu_amx.cc: bfloat16 on AMX tiles): the shapes, the mask's key tiles and the exponential.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_tasks.h"

namespace llava_next {

constexpr int64_t kTile = 64;      // keys per tile
constexpr int64_t kRows = 128;     // query rows per task (positions x query heads of a kv head)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Shapes {
  int64_t B, T, N, H, K, S, G;  // the decode kernel uses these alone, with k and v [B, K, H, S]
  int64_t positions;  // query positions per task: about kRows / G, at least 1
  int64_t Hp;         // H rounded up to the kernel's column multiple (packed tiles are zero beyond H)
  int64_t tiles;      // key tiles: ceil(S / kTile)
};

// Checks q [B, T, N, H], k and v [B, K, S, H] (N a multiple of K), mask [B, T, S] and fills s: about
// kRows / G positions a task, a multiple of micro_rows / gcd(G, micro_rows) so that a task's
// rows fill whole register tiles of micro_rows rows, and H rounded up to a multiple of `columns`.
inline bool ReadShapes(xla::ffi::Span<const int64_t> qd, xla::ffi::Span<const int64_t> kd,
                       xla::ffi::Span<const int64_t> vd, xla::ffi::Span<const int64_t> md, int64_t micro_rows,
                       int64_t columns, Shapes& s) {
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || md.size() != 3 || kd[0] != qd[0] ||
      kd[3] != qd[3] || kd[1] < 1 || qd[2] % kd[1] != 0 || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] ||
      vd[3] != kd[3] || md[0] != qd[0] || md[1] != qd[1] || md[2] != kd[2])
    return false;
  s = Shapes{qd[0], qd[1], qd[2], qd[3], kd[1], kd[2], qd[2] / kd[1], 1, 0, 0};
  const int64_t step = micro_rows / std::gcd<int64_t>(s.G, micro_rows);
  s.positions = std::max<int64_t>(1, (kRows / s.G + step - 1) / step) * step;
  s.Hp = (s.H + columns - 1) / columns * columns;
  s.tiles = (s.S + kTile - 1) / kTile;
  return true;
}

constexpr const char* kShapeError = "want q [B, T, N, H], k and v [B, K, S, H] (N a multiple of K), mask [B, T, S]";

// The index of query row r of (row b, kv head kh) in q [B, T, N, ...]: position r / G, head kh * G + r % G.
inline int64_t QueryIndex(const Shapes& s, int64_t b, int64_t kh, int64_t r) {
  return (b * s.T + r / s.G) * s.N + kh * s.G + r % s.G;
}

// The mask [B, T, S] as bits, one 64-bit word per (row, position, key tile): bit j set where the
// position sees key j of the tile (zero past the last tile's keys). Read once a call (`ReadMask`):
// the tasks of every kv head ask what each of their positions sees of each key tile. Scanning the
// mask's bytes in each of them (5.9 MB at 2432 tokens, read once per kv head, then again for the bias
// of a tile's partly visible rows) took ~10% of the bf16 kernel's time there; the words are an eighth
// of the mask and stay in the cache.
static_assert(kTile == 64, "a key tile's mask is one 64-bit word");
struct Mask {
  const uint64_t* bits;  // [B, T, tiles]
};

inline std::vector<uint64_t> ReadMask(xla::ffi::ThreadPool& pool, const Shapes& s, const bool* mask) {
  constexpr int64_t kPositions = 64;  // a task's positions
  const int64_t n = s.B * s.T;
  std::vector<uint64_t> bits(n * s.tiles);
  uint64_t* out = bits.data();
  RunTasks(pool, (n + kPositions - 1) / kPositions, [=](int64_t i) {
    for (int64_t bt = i * kPositions; bt < std::min(n, (i + 1) * kPositions); ++bt)
      for (int64_t tile = 0; tile < s.tiles; ++tile) {
        const bool* m = mask + bt * s.S + tile * kTile;
        const int64_t width = std::min(kTile, s.S - tile * kTile);
        uint64_t word = 0;
        int64_t j = 0;
        for (; j + 8 <= width; j += 8) {  // 8 bytes of 0 or 1 to 8 bits: byte i's low bit to bit 56 + i
          uint64_t bytes;
          std::memcpy(&bytes, m + j, sizeof bytes);
          word |= ((bytes & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56 << j;
        }
        for (; j < width; ++j) word |= uint64_t(m[j] != 0) << j;
        out[bt * s.tiles + tile] = word;
      }
  });
  return bits;
}

// Positions [t0, t1) of row b at one key tile: whether any of its keys is visible to them (the return
// value), whether all are to all (`all`: a whole tile), each position's extent (its visible keys lie
// in [0, extent)) and, unless all, its mask bias (0 or -inf a key, kTile floats a position).
inline bool TileMask(const Shapes& s, const Mask& mask, int64_t b, int64_t t0, int64_t t1, int64_t tile, float* bias,
                     int64_t* extent, bool& all) {
  const uint64_t* bits = mask.bits + (b * s.T + t0) * s.tiles + tile;
  uint64_t ored = 0, anded = ~uint64_t(0);
  for (int64_t t = 0; t < t1 - t0; ++t) {
    ored |= bits[t * s.tiles];
    anded &= bits[t * s.tiles];
  }
  if (ored == 0) return false;
  all = anded == ~uint64_t(0);
  for (int64_t t = 0; t < t1 - t0; ++t) {
    const uint64_t row = bits[t * s.tiles];
    extent[t] = row == 0 ? 0 : kTile - __builtin_clzll(row);
    if (!all)
      for (int64_t j = 0; j < kTile; ++j) bias[t * kTile + j] = row >> j & 1 ? 0.0f : kNegInf;
  }
  return true;
}

// A prompt kernel's forward pass over its tasks: each (row, kv head, key tile) packed by pack(pair,
// tile, out) into `tile_size` values of a buffer and the mask read (`ReadMask`), then attend(packed,
// mask, b, kh, t0, t1) for each block of s.positions query positions, as tasks on XLA's pool (later
// positions, which see more keys, first).
template <typename E, typename Pack, typename Attend>
void PackAndAttend(xla::ffi::ThreadPool& pool, const Shapes& s, const bool* mask, int64_t tile_size, Pack pack,
                   Attend attend) {
  const int64_t pairs = s.B * s.K, blocks = (s.T + s.positions - 1) / s.positions;
  std::unique_ptr<E[]> buffer(new E[pairs * s.tiles * tile_size]);
  E* packed = buffer.get();
  RunTasks(pool, pairs * s.tiles, [=](int64_t i) { pack(i / s.tiles, i % s.tiles, packed + i * tile_size); });
  const std::vector<uint64_t> bits = ReadMask(pool, s, mask);
  const Mask m{bits.data()};
  RunTasks(pool, pairs * blocks, [=](int64_t i) {
    const int64_t block = blocks - 1 - i / pairs, pair = i % pairs, t0 = block * s.positions;
    attend(static_cast<const E*>(packed), m, pair / s.K, pair % s.K, t0, std::min(s.T, t0 + s.positions));
  });
}

// Rows [r0, r0 + n) of a (row, kv head) (row r: position r / G), with TileMask's bias and
// extent from position t0 on: each row's bias and the depth of keys any of them sees. Rows past
// last_row (padding) take its mask.
template <int n>
inline int64_t RowGroup(const Shapes& s, int64_t r0, int64_t t0, int64_t last_row, const float* bias,
                        const int64_t* extent, const float* (&row_bias)[n]) {
  int64_t depth = 0;
  for (int r = 0; r < n; ++r) {
    const int64_t position = std::min(r0 + r, last_row) / s.G - t0;
    row_bias[r] = bias + position * kTile;
    depth = std::max(depth, extent[position]);
  }
  return depth;
}

// 2^f for f in [-0.5, 0.5] in each lane of a float vector: Cephes' exp2f polynomial (relative error ~2e-7).
template <typename V>
inline V Exp2Fraction(V f) {
  V p = V{} + 1.535336188319500e-4f;
  for (float c : {1.339887440266574e-3f, 9.618437357674640e-3f, 5.550332471162809e-2f, 2.402264791363012e-1f,
                  6.931472028550421e-1f, 1.0f})
    p = p * f + c;
  return p;
}

// e^x for x <= 0 in each lane of a float vector (a GCC/Clang vector extension type): 2^n * 2^f, 2^f on
// [-0.5, 0.5] by `Exp2Fraction`; 0 at or below -87 (e^-87 ~ 1.6e-38),
// -inf included: whatever such a lane computes is masked off.
template <typename V>
inline V Exp(V x) {
  typedef decltype(x > x) I;  // the lanes' comparison masks: int32 lanes
  typedef uint32_t U __attribute__((vector_size(sizeof(V))));
  const auto splat = [](float c) { return V{} + c; };
  const I keep = x > splat(-87.0f);
  const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer in the low bits
  const V shifted = x * splat(1.44269504088896341f) + magic;
  const V n = shifted - magic;
  const V f = x * splat(1.44269504088896341f) - n;
  const V p = Exp2Fraction(f);
  const U power = ((U)shifted << 23) + (127u << 23);  // 2^n as float bits: shifted's low bits hold n
  return (V)((I)(p * (V)power) & keep);
}

template <typename V>
inline float HorizontalSum(V v) {
  float sum = 0.0f;
  for (int i = 0; i < int(sizeof v / sizeof sum); ++i) sum += v[i];
  return sum;
}

template <typename V>  // a float vector
inline float HorizontalMax(V v) {
  float m = v[0];
  for (int i = 1; i < int(sizeof v / sizeof m); ++i) m = std::max(m, v[i]);
  return m;
}

}  // namespace llava_next
