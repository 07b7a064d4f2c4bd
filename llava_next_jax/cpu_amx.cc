// bfloat16 on AMX tiles (Intel's Advanced Matrix Extensions, Sapphire Rapids and later) for XLA:CPU:
// attention over a prompt, out[b, t, n] = softmax over the keys s that mask[b, t, s] allows of
// scale * q[b, t, n] . k[b, n / G, s], times v[b, n / G, s]; and products x @ w (their section below).
//
// The float32 kernel's walk (cpu_attention.cc: a task takes the G query heads of one kv head at a block
// of positions and walks the key tiles its mask reaches with an online softmax) with both products on
// tiles, transposed: the logits of 16 query rows over a 64-key tile are four 16 x 16 float32 tiles
// (keys x rows) of bf16 products summed in float32 (TDPBF16PS over 32 head dims at a time), scaled and
// softmaxed on 16-float vectors that each hold one key's logits for the 16 rows; the weights are
// rounded to bfloat16 (as PyTorch's CPU flash attention does for bf16 inputs, its running sums staying
// float32) and multiplied by the values into head dims x rows tiles. The products that run at ~64
// float32 multiply-adds a cycle on vector registers run at ~1000 on the tiles. The keys (rows of head
// dims) and values (transposed) of a tile are packed once; the queries and the weights go in the pairs
// layout the tiles multiply (two adjacent head dims, or two adjacent keys, side by side). Built where
// the compiler targets AMX (-march=native on such a CPU); EnableAmx asks Linux for the tiles' state
// once a process, and cpu_kernels.py sends bfloat16 work here only where it was granted.
#include <cstdint>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_attention.h"
#include "cpu_tasks.h"

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__) && defined(__linux__)
#define LLAVA_NEXT_AMX 1
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace ffi = xla::ffi;

namespace {

#ifdef LLAVA_NEXT_AMX

using llava_next::Exp2Fraction;
using llava_next::kNegInf;
using llava_next::kShapeError;
using llava_next::kTile;
using llava_next::Mask;
using llava_next::QueryIndex;
using llava_next::RowGroup;
using llava_next::RunTasks;
using llava_next::Shapes;
using llava_next::TileMask;

constexpr int64_t kBlock = 16;     // rows of a tile; float32 columns of a result tile
constexpr int64_t kDepth = 32;     // bfloat16 values a tile row holds (64 bytes): a product's depth per step

// float32 to bfloat16, rounded to nearest even (NaN stays NaN).
inline uint16_t ToBf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

// The same, 16 lanes at a time.
inline __m256i ToBf16(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x), high = _mm512_srli_epi32(bits, 16);
  const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
  const __m512i rounded =
      _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40))));
}

constexpr float kLog2e = 1.44269504088896341f;

// 2^y for y <= 0 in 16 lanes: 2^n * 2^f with n = round(y) and 2^f on [-0.5, 0.5] by `Exp2Fraction`
// (the scaling by 2^n one instruction). y is clamped to -127 first, -inf included: 2^-127, a subnormal
// that the conversion of the weights to bfloat16 flushes to 0 (and ~1e-38 of a weights' sum >= 1).
inline __m512 Exp2(__m512 y) {
  y = _mm512_max_ps(y, _mm512_set1_ps(-127.0f));
  const __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(Exp2Fraction(_mm512_sub_ps(y, n)), n);
}

// Every tile register: 16 rows of 64 bytes (palette 1).
void ConfigureTiles() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int i = 0; i < 8; ++i) {
    config.bytes[i] = 64;
    config.rows[i] = kBlock;
  }
  // GCC's _tile_loadconfig tells the compiler it reads 8 bytes of the 64 ("m" of a pointer): without
  // this barrier -O2 drops the stores of the rows and widths as dead, and the first tile op faults.
  asm volatile("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

// The keys and values of one (row, kv head, tile) as the tiles multiply them, zero beyond the tile's
// keys and beyond H: keys [kTile, Hp] (a key's head dims a row), values transposed [Hp, kTile] (a head
// dim's values of every key a row).
void PackTile(const Shapes& s, const uint16_t* k, const uint16_t* v, int64_t pair, int64_t tile, uint16_t* keys,
              uint16_t* values) {
  const int64_t s0 = tile * kTile, width = std::min(kTile, s.S - s0);
  const uint16_t* kp = k + (pair * s.S + s0) * s.H;
  const uint16_t* vp = v + (pair * s.S + s0) * s.H;
  std::fill(keys, keys + kTile * s.Hp, uint16_t(0));
  std::fill(values, values + s.Hp * kTile, uint16_t(0));
  for (int64_t j = 0; j < width; ++j) {
    std::memcpy(keys + j * s.Hp, kp + j * s.H, s.H * sizeof(uint16_t));
    for (int64_t d = 0; d < s.H; ++d) values[d * kTile + j] = vp[j * s.H + d];
  }
}

// Logits transposed, x[kTile, 16] (a key's logits for the 16 query rows a row) = keys [kTile, Hp] .
// queries, the queries in pairs layout [Hp / 2, 16, 2] (row i: head dims 2i and 2i + 1 of each query
// row): the four 16-key blocks in tiles 0-3, the queries' 32 head dims of a step in tile 4, the keys'
// in tiles 5 and 6.
inline void Logits(const uint16_t* queries, const uint16_t* keys, int64_t Hp, float* x) {
  const int64_t key_bytes = Hp * sizeof(uint16_t);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t d = 0; d < Hp; d += kDepth) {
    _tile_loadd(4, queries + d * kBlock, kDepth * sizeof(uint16_t));
    _tile_loadd(5, keys + d, key_bytes);
    _tile_dpbf16ps(0, 5, 4);
    _tile_loadd(6, keys + kBlock * Hp + d, key_bytes);
    _tile_dpbf16ps(1, 6, 4);
    _tile_loadd(5, keys + 2 * kBlock * Hp + d, key_bytes);
    _tile_dpbf16ps(2, 5, 4);
    _tile_loadd(6, keys + 3 * kBlock * Hp + d, key_bytes);
    _tile_dpbf16ps(3, 6, 4);
  }
  constexpr int64_t row_bytes = kBlock * sizeof(float);
  _tile_stored(0, x, row_bytes);
  _tile_stored(1, x + kBlock * kBlock, row_bytes);
  _tile_stored(2, x + 2 * kBlock * kBlock, row_bytes);
  _tile_stored(3, x + 3 * kBlock * kBlock, row_bytes);
}

// Outputs transposed, acc[Hp, 16] (a head dim's sums for the 16 query rows a row) += values [Hp, kTile]
// . w, the weights in pairs layout [kTile / 2, 16, 2] (row i: keys 2i and 2i + 1 of each query row;
// keys 32-63 read only where depth > 32): 32 head dims a step in tiles 0 and 1, the weights of keys
// 0-31 and 32-63 in tiles 4 and 5, the values in tiles 6, 7 and 2, 3.
inline void Output(const uint16_t* w, const uint16_t* values, int64_t depth, int64_t Hp, float* acc) {
  constexpr int64_t value_bytes = kTile * sizeof(uint16_t), acc_bytes = kBlock * sizeof(float);
  const bool both = depth > kDepth;
  _tile_loadd(4, w, kDepth * sizeof(uint16_t));
  if (both) _tile_loadd(5, w + kDepth / 2 * kDepth, kDepth * sizeof(uint16_t));
  for (int64_t d = 0; d < Hp; d += 2 * kBlock) {
    float* low = acc + d * kBlock;
    float* high = low + kBlock * kBlock;
    _tile_loadd(0, low, acc_bytes);
    _tile_loadd(1, high, acc_bytes);
    _tile_loadd(6, values + d * kTile, value_bytes);
    _tile_dpbf16ps(0, 6, 4);
    _tile_loadd(7, values + (d + kBlock) * kTile, value_bytes);
    _tile_dpbf16ps(1, 7, 4);
    if (both) {
      _tile_loadd(2, values + d * kTile + kDepth, value_bytes);
      _tile_dpbf16ps(0, 2, 5);
      _tile_loadd(3, values + (d + kBlock) * kTile + kDepth, value_bytes);
      _tile_dpbf16ps(1, 3, 5);
    }
    _tile_stored(0, low, acc_bytes);
    _tile_stored(1, high, acc_bytes);
  }
}

// One task: query positions [t0, t1) of row b, the G query heads of kv head kh (row r of the task:
// position t0 + r / G, query head kh * G + r % G), 16 rows at a time through each key tile. Logits and
// outputs are computed transposed (keys x rows, head dims x rows), so that each of the 16 rows is a
// lane of every vector: the online softmax's maxima, sums and rescaling are elementwise, with no
// reductions across lanes (each row's horizontal maximum and sum a tile, and a scalar exp, took ~25%
// of the kernel's time with rows as rows).
void AttendBlock(const Shapes& s, const uint16_t* q, const Mask& mask, const uint16_t* packed, float scale,
                 int64_t b, int64_t kh, int64_t t0, int64_t t1, uint16_t* out, float* lse) {
  const int64_t G = s.G, H = s.H, Hp = s.Hp;
  const int64_t rows = (t1 - t0) * G;
  const int64_t groups = (rows + kBlock - 1) / kBlock;
  // Per group of 16 rows: the queries in pairs layout (zero beyond H and beyond the task's rows), the
  // outputs transposed before the division by the weights' sum, each row's largest scaled logit so far
  // and its weights' sum.
  std::vector<uint16_t> queries(groups * Hp * kBlock, 0);
  std::vector<float> acc(groups * Hp * kBlock, 0.0f), bias((t1 - t0) * kTile);
  std::vector<float> top(groups * kBlock, kNegInf), total(groups * kBlock, 0.0f);
  std::vector<int64_t> extent(t1 - t0);
  for (int64_t r = 0; r < rows; ++r) {  // head dims 2i and 2i + 1 as one 32-bit word, to pair row i
    const uint16_t* row = q + QueryIndex(s, b, kh, t0 * G + r) * H;
    uint32_t* pairs = reinterpret_cast<uint32_t*>(&queries[r / kBlock * Hp * kBlock]) + r % kBlock;
    for (int64_t i = 0; i < H / 2; ++i) std::memcpy(pairs + i * kBlock, row + 2 * i, sizeof(uint32_t));
    if (H % 2) pairs[H / 2 * kBlock] = row[H - 1];  // the last dim's partner is zero
  }
  alignas(64) float x[kTile * kBlock], bias_t[kTile * kBlock];
  alignas(64) uint16_t w[kTile * kBlock];
  // interleaves two keys' 16 bf16 weights (one vector holding both) into 16 pairs
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                                              22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512 factor = _mm512_set1_ps(scale * kLog2e), none = _mm512_set1_ps(kNegInf);
  ConfigureTiles();
  for (int64_t tile = 0; tile < s.tiles; ++tile) {
    bool all;  // nothing here visible to any of the task's queries: skipped
    if (!TileMask(s, mask, b, t0, t1, tile, bias.data(), extent.data(), all)) continue;
    const uint16_t* keys = packed + ((b * s.K + kh) * s.tiles + tile) * 2 * Hp * kTile;
    const uint16_t* values = keys + Hp * kTile;
    for (int64_t g = 0; g < groups; ++g) {
      const float* row_bias[kBlock];  // padded rows (zero queries) take the last row's mask
      const int64_t depth =
          RowGroup(s, t0 * G + g * kBlock, t0, t0 * G + rows - 1, bias.data(), extent.data(), row_bias);
      if (depth == 0) continue;
      const int64_t used = (depth + kDepth - 1) / kDepth * kDepth;  // keys softmaxed: the rest weigh 0
      if (!all)
        for (int64_t j = 0; j < used; ++j)
          for (int r = 0; r < kBlock; ++r) bias_t[j * kBlock + r] = row_bias[r][j];
      Logits(&queries[g * Hp * kBlock], keys, Hp, x);
      // key j's logits before scaling, the mask's -inf added where the tile is not all visible
      const auto logits = [&](int64_t j) {
        const __m512 xj = _mm512_load_ps(x + j * kBlock);
        return all ? xj : _mm512_add_ps(xj, _mm512_load_ps(bias_t + j * kBlock));
      };
      __m512 most = none;
      for (int64_t j = 0; j < used; ++j) most = _mm512_max_ps(most, logits(j));
      float* group_top = &top[g * kBlock];
      float* group_total = &total[g * kBlock];
      const __m512 old_top = _mm512_loadu_ps(group_top);
      const __m512 new_top = _mm512_max_ps(old_top, _mm512_mul_ps(most, _mm512_set1_ps(scale)));
      // rows that have seen a key: the others (new_top -inf) get no weights and keep a sum of 0
      const __mmask16 seen = _mm512_cmp_ps_mask(new_top, none, _CMP_NEQ_OQ);
      // e^(scale * x - new_top) = 2^(x * scale * log2(e) - new_top * log2(e))
      const __m512 offset = _mm512_maskz_mul_ps(seen, new_top, _mm512_set1_ps(-kLog2e));
      __m512 sum = _mm512_setzero_ps();
      for (int64_t j = 0; j < used; j += 2) {
        const __m512 first = Exp2(_mm512_fmadd_ps(logits(j), factor, offset));
        const __m512 second = Exp2(_mm512_fmadd_ps(logits(j + 1), factor, offset));
        sum = _mm512_add_ps(sum, _mm512_add_ps(first, second));
        const __m512i pairs = _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(second, first));
        _mm512_store_si512(w + j * kBlock, pairs);
      }
      // ~0 for a row's first visible tile (2^-127: its old top is -inf, its sums 0), 1 for rows that have
      // seen nothing yet
      const __m512 rescale = _mm512_mask_blend_ps(
          seen, _mm512_set1_ps(1.0f), Exp2(_mm512_mul_ps(_mm512_sub_ps(old_top, new_top), _mm512_set1_ps(kLog2e))));
      _mm512_storeu_ps(group_total,
                       _mm512_fmadd_ps(_mm512_loadu_ps(group_total), rescale, _mm512_maskz_mov_ps(seen, sum)));
      _mm512_storeu_ps(group_top, new_top);
      float* group_acc = &acc[g * Hp * kBlock];
      if (_mm512_cmp_ps_mask(rescale, _mm512_set1_ps(1.0f), _CMP_NEQ_OQ))
        for (int64_t d = 0; d < Hp; ++d)
          _mm512_storeu_ps(group_acc + d * kBlock, _mm512_mul_ps(_mm512_loadu_ps(group_acc + d * kBlock), rescale));
      Output(w, values, depth, Hp, group_acc);
    }
  }
  _tile_release();
  const __m512i column = _mm512_mullo_epi32(  // a row's sums for 16 head dims, gathered from acc's rows
      _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_epi32(kBlock));
  for (int64_t r = 0; r < rows; ++r) {  // a row that sees no key gets zeros (and a log-sum-exp of +inf)
    const float inverse = total[r] > 0.0f ? 1.0f / total[r] : 0.0f;
    const int64_t index = QueryIndex(s, b, kh, t0 * G + r);
    const float* sums = &acc[r / kBlock * Hp * kBlock + r % kBlock];
    int64_t d = 0;
    for (; d + kBlock <= H; d += kBlock) {
      const __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(column, sums + d * kBlock, sizeof(float)),
                                     _mm512_set1_ps(inverse));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + index * H + d), ToBf16(v));
    }
    for (; d < H; ++d) out[index * H + d] = ToBf16(sums[d * kBlock] * inverse);
    lse[index] = total[r] > 0.0f ? top[r] + std::log(total[r]) : -kNegInf;
  }
}

// --- products: out [M, N] = x [M, K] @ w [K, N], bfloat16, float32 sums ---------------------------
//
// A task takes a panel of `columns` columns of w (a multiple of 32, at most ~1 MB packed, which stays
// in the core's second-level cache: the tiles' reads slow down by a fifth from ~1.5 MB) and packs it
// tile by tile: for each 32 columns and each 32 rows of depth, two 16 x 32 tiles in pairs layout (rows
// k and k + 1 of 16 columns side by side), 2 KB contiguous, zero beyond N. It walks x's rows 32 at a
// time, the depth in chunks of kChunk: the chunk of 32 rows is copied tile by tile too (16 KB,
// contiguous, zero past M: read in place, rows 2 or 8 KB apart share a few first-level cache sets and
// evict each other) and meets each 32 columns of the panel, 32 x 32 sums in tiles 0-3 (kept in a
// float32 block between chunks), x's rows in tiles 4 and 5, the panel's in 6 and 7, loaded with the
// hint not to keep them in the first-level cache (each is read once a chunk; x's chunk stays there).
// The sums are rounded to bfloat16 once, at the end. The copies took the product of the generation
// benchmark's MLP (`[2432, 1024] @ [1024, 4096]`) from ~12.2 to ~10 ms (benchmarks/cpu_gemm.py).
// A panel at least kMinPanel columns wide whose depth does not fit in ~1 MB is taken in slabs of the
// depth, one after the other, every row block's float32 sums kept between them: fewer, wider panels,
// so x (read once a panel) is read fewer times (`[2432, 4096] @ [4096, 1024]`, 8 passes over its 20 MB
// of x: ~13 -> ~11 ms in two slabs of 256 columns).

constexpr int64_t kGemmRows = 2 * kBlock, kGemmColumns = 2 * kBlock, kChunk = 256;
constexpr int64_t kTileValues = kBlock * kDepth;  // bfloat16 values of a tile: 16 rows of 32
constexpr int64_t kPanelBytes = int64_t(1) << 20, kMinPanel = 8 * kGemmColumns;

// n columns rounded up to whole 32-column blocks.
inline int64_t WholeBlocks(int64_t n) { return (n + kGemmColumns - 1) / kGemmColumns * kGemmColumns; }

// Columns a task takes: as many as kPanelBytes of packed panel hold, at least kMinPanel (deeper panels
// go in slabs, `SlabDepth`), but no fewer tasks than threads. Each task reads all of x once, so wider
// panels read it fewer times: 512 columns took `[2432, 1024] @ [1024, 4096]` from ~11 to ~9 ms
// against 256.
int64_t PanelColumns(int64_t K, int64_t N, int64_t threads) {
  const int64_t fit = std::max(kMinPanel, kPanelBytes / (K * int64_t(sizeof(uint16_t))) / kGemmColumns * kGemmColumns);
  return std::max(kGemmColumns, std::min(fit, WholeBlocks((N + threads - 1) / threads)));
}

// The depth of a slab of a panel `padded` columns wide: what fits in kPanelBytes, in whole chunks, K at most.
int64_t SlabDepth(int64_t K, int64_t padded) {
  return std::min(K, std::max(kChunk, kPanelBytes / (padded * int64_t(sizeof(uint16_t))) / kChunk * kChunk));
}

// w's columns [n0, n0 + width) packed by tiles: [padded / 32][K / 32][2 tiles][16 pairs of rows][16 columns][2]
// (zero beyond width).
void PackPanel(const uint16_t* w, int64_t K, int64_t N, int64_t n0, int64_t width, int64_t padded, uint16_t* panel) {
  alignas(64) static const uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(kLow), high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  const int64_t steps = K / kDepth;
  for (int64_t k = 0; k < K; k += 2) {
    const uint16_t *even = w + k * N + n0, *odd = even + N;
    uint16_t* row = panel + k / kDepth * 2 * kTileValues + k % kDepth / 2 * kDepth;
    for (int64_t j = 0; j < padded; j += kGemmColumns) {  // 32 columns of rows k and k + 1, interleaved
      uint16_t* to = row + j / kGemmColumns * steps * 2 * kTileValues;
      if (j + kGemmColumns <= width) {
        const __m512i a = _mm512_loadu_si512(even + j), b = _mm512_loadu_si512(odd + j);
        _mm512_storeu_si512(to, _mm512_permutex2var_epi16(a, low, b));
        _mm512_storeu_si512(to + kTileValues, _mm512_permutex2var_epi16(a, high, b));
      } else {
        for (int64_t c = 0; c < kGemmColumns; ++c) {
          uint16_t* pair = to + c / kBlock * kTileValues + c % kBlock * 2;
          pair[0] = j + c < width ? even[j + c] : 0;
          pair[1] = j + c < width ? odd[j + c] : 0;
        }
      }
    }
  }
}

// x's rows [r0, r0 + rows) and depth [k0, k1) by tiles: [(k1 - k0) / 32][2 tiles][16 rows][32], zero rows
// from `rows` to 32.
void PackChunk(const uint16_t* x, int64_t K, int64_t r0, int64_t rows, int64_t k0, int64_t k1, uint16_t* chunk) {
  for (int64_t r = 0; r < kGemmRows; ++r) {
    uint16_t* to = chunk + r / kBlock * kTileValues + r % kBlock * kDepth;
    for (int64_t k = k0; k < k1; k += kDepth, to += 2 * kTileValues)
      _mm512_storeu_si512(to, r < rows ? _mm512_loadu_si512(x + (r0 + r) * K + k) : _mm512_setzero_si512());
  }
}

// out[0:rows, 0:width] (rows N apart) = the float32 sums (rows kGemmColumns apart), rounded to bfloat16.
inline void StoreRounded(const float* sums, int64_t rows, int64_t width, uint16_t* out, int64_t N) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* from = sums + r * kGemmColumns;
    uint16_t* to = out + r * N;
    if (width == kGemmColumns) {
      const __m512bh pairs = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(from + kBlock), _mm512_loadu_ps(from));
      std::memcpy(to, &pairs, sizeof pairs);
    } else {
      for (int64_t j = 0; j < width; ++j) to[j] = ToBf16(from[j]);
    }
  }
}

void GemmPanel(const uint16_t* x, const uint16_t* w, int64_t M, int64_t K, int64_t N, int64_t n0, int64_t columns,
               uint16_t* out) {
  const int64_t width = std::min(columns, N - n0), padded = WholeBlocks(width);
  const int64_t blocks = padded / kGemmColumns, slab = SlabDepth(K, padded);
  const int64_t block_sums = blocks * kGemmRows * kGemmColumns;  // a row block's float32 sums
  // Kept between calls (no fresh pages each time), 64-byte aligned: a tile row is a cache line.
  thread_local std::vector<__m512i> panel_lines, chunk_lines;
  thread_local std::vector<float> sums;  // [row blocks (1 without slabs)][blocks][32][32]
  panel_lines.resize(slab * padded * sizeof(uint16_t) / sizeof(__m512i));
  chunk_lines.resize(kGemmRows * kChunk * sizeof(uint16_t) / sizeof(__m512i));
  sums.resize((slab < K ? (M + kGemmRows - 1) / kGemmRows : 1) * block_sums);
  uint16_t* panel = reinterpret_cast<uint16_t*>(panel_lines.data());
  uint16_t* chunk = reinterpret_cast<uint16_t*>(chunk_lines.data());
  constexpr int64_t sums_bytes = kGemmColumns * sizeof(float), tile_bytes = kDepth * sizeof(uint16_t);
  ConfigureTiles();
  for (int64_t k_start = 0; k_start < K; k_start += slab) {
    const int64_t k_end = std::min(K, k_start + slab), steps = (k_end - k_start) / kDepth;
    PackPanel(w + k_start * N, k_end - k_start, N, n0, width, padded, panel);
    for (int64_t r0 = 0; r0 < M; r0 += kGemmRows) {
      const int64_t rows = std::min(kGemmRows, M - r0);
      float* row_sums = sums.data() + (slab < K ? r0 / kGemmRows * block_sums : 0);
      for (int64_t k0 = k_start; k0 < k_end; k0 += kChunk) {
        const int64_t k1 = std::min(k_end, k0 + kChunk);
        PackChunk(x, K, r0, rows, k0, k1, chunk);
        for (int64_t c = 0; c < blocks; ++c) {
          float* block = row_sums + c * kGemmRows * kGemmColumns;
          if (k0 == 0) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
          } else {
            _tile_loadd(0, block, sums_bytes);
            _tile_loadd(1, block + kBlock, sums_bytes);
            _tile_loadd(2, block + kBlock * kGemmColumns, sums_bytes);
            _tile_loadd(3, block + kBlock * kGemmColumns + kBlock, sums_bytes);
          }
          const uint16_t* a = chunk;
          const uint16_t* b = panel + (c * steps + (k0 - k_start) / kDepth) * 2 * kTileValues;
          for (int64_t k = k0; k < k1; k += kDepth, a += 2 * kTileValues, b += 2 * kTileValues) {
            _tile_loadd(4, a, tile_bytes);
            _tile_loadd(5, a + kTileValues, tile_bytes);
            _tile_stream_loadd(6, b, tile_bytes);
            _tile_stream_loadd(7, b + kTileValues, tile_bytes);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
          _tile_stored(0, block, sums_bytes);
          _tile_stored(1, block + kBlock, sums_bytes);
          _tile_stored(2, block + kBlock * kGemmColumns, sums_bytes);
          _tile_stored(3, block + kBlock * kGemmColumns + kBlock, sums_bytes);
          if (k1 == K)
            StoreRounded(block, rows, std::min(kGemmColumns, width - c * kGemmColumns),
                         out + r0 * N + n0 + c * kGemmColumns, N);
        }
      }
    }
  }
  _tile_release();
}

#endif  // LLAVA_NEXT_AMX

// q [B, T, N, H], k and v [B, K, S, H] bfloat16, mask [B, T, S] -> out [B, T, N, H] bfloat16 and each
// query's log-sum-exp of its scaled logits, lse [B, T, N] (+inf where it sees no key); N a multiple of K.
ffi::Error FlashAttentionBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> q, ffi::Buffer<ffi::BF16> k,
                                  ffi::Buffer<ffi::BF16> v, ffi::Buffer<ffi::PRED> mask,
                                  ffi::ResultBuffer<ffi::BF16> out, ffi::ResultBuffer<ffi::F32> lse, float scale) {
#ifdef LLAVA_NEXT_AMX
  Shapes s;
  if (!llava_next::ReadShapes(q.dimensions(), k.dimensions(), v.dimensions(), mask.dimensions(), kBlock, kDepth,
                              s))
    return ffi::Error::InvalidArgument(std::string("llava_next_flash_attention_bf16: ") + kShapeError);
  const uint16_t *qs = q.typed_data(), *ks = k.typed_data(), *vs = v.typed_data();
  const bool* ms = mask.typed_data();
  uint16_t* os = out->typed_data();
  float* ls = lse->typed_data();
  llava_next::PackAndAttend<uint16_t>(
      pool, s, ms, 2 * s.Hp * kTile,
      [=](int64_t pair, int64_t tile, uint16_t* keys) { PackTile(s, ks, vs, pair, tile, keys, keys + s.Hp * kTile); },
      [=](const uint16_t* packed, const Mask& mask, int64_t b, int64_t kh, int64_t t0, int64_t t1) {
        AttendBlock(s, qs, mask, packed, scale, b, kh, t0, t1, os, ls);
      });
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "llava_next_flash_attention_bf16: built without AMX");
#endif
}

// x [M, K] and w [K, N] bfloat16, K a multiple of 32 -> out [M, N] = x @ w, float32 sums rounded to bfloat16.
ffi::Error GemmBf16Impl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                        ffi::ResultBuffer<ffi::BF16> out) {
#ifdef LLAVA_NEXT_AMX
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || xd[1] % kDepth != 0)
    return ffi::Error::InvalidArgument("llava_next_gemm_bf16: want x [M, K] and w [K, N], K a multiple of 32");
  const int64_t M = xd[0], K = xd[1], N = wd[1], columns = PanelColumns(K, N, pool.num_threads());
  const uint16_t *xs = x.typed_data(), *ws = w.typed_data();
  uint16_t* os = out->typed_data();
  RunTasks(pool, (N + columns - 1) / columns,
           [=](int64_t i) { GemmPanel(xs, ws, M, K, N, i * columns, columns, os); });
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented, "llava_next_gemm_bf16: built without AMX");
#endif
}

}  // namespace

// Asks Linux for the AMX tiles' state for this process (once; every thread may then use the tiles):
// 1 where granted, 0 where refused or the library was built for a CPU without AMX.
extern "C" int EnableAmx() {
#ifdef LLAVA_NEXT_AMX
  constexpr long kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return 0;
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlashAttentionBf16, FlashAttentionBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // q
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // k
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // v
                                  .Arg<ffi::Buffer<ffi::PRED>>()   // mask
                                  .Ret<ffi::Buffer<ffi::BF16>>()   // out
                                  .Ret<ffi::Buffer<ffi::F32>>()    // lse
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemmBf16, GemmBf16Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // x
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // w
                                  .Ret<ffi::Buffer<ffi::BF16>>());  // out
