// Products for XLA:CPU. Few-row matmul: y[R, N] = x[R, K] @ w[K, N] with 1 <= R <= 8 (a decode step), x
// and y float32, the weight kernel w float32 or bfloat16 (widened to float32 as it is read; float32
// sums). Large products on oneDNN's gemm functions (below).
//
// XLA:CPU runs such a product as a general matmul that packs the kernel before multiplying, and a
// bfloat16 kernel it first converts to float32 in memory; a decode step is all streaming of
// weights, and both cost about half the speed of it. Here the kernel is read once, in order, as
// tasks for XLA's thread pool: the K rows in two halves (each read front to back, four rows at a
// time, into a partial y[R, N] small enough to stay in cache; the two partials summed at the end),
// and with more than two threads the N columns in ranges of at least kMinColumns as well. Built
// and loaded by llava_next_jax/cpu_kernels.py; the loops are plain C++ that the compiler vectorises
// (-O3 -march=native).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_attention.h"
#include "cpu_products.h"
#include "cpu_tasks.h"

namespace ffi = xla::ffi;

namespace {

using llava_next::Partial;
using llava_next::RunTasks;

constexpr int kMaxRows = 8;
constexpr int64_t kMinColumns = 256;  // a task reads runs of at least 1 KiB (float32) per weight row

// `tasks`: into how many pieces to split the product (0: one per thread of XLA's pool): `k_parts`
// (1 or 2) ranges of K times `n_parts` ranges of N.
ffi::Error FewRowMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                            ffi::ResultBuffer<ffi::F32> y, int64_t tasks) {
  auto xd = x.dimensions(), wd = w.dimensions();
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || xd[0] < 1 || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument("llava_next_fewrow_matmul: want x [R <= 8, K] and w [K, N]");
  if (!bf16 && w.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("llava_next_fewrow_matmul: w must be float32 or bfloat16");
  const int64_t rows = xd[0], K = xd[1], N = wd[1];
  if (tasks <= 0) tasks = pool.num_threads();
  const int64_t k_parts = tasks >= 2 && K >= 128 ? 2 : 1;
  const int64_t n_parts = std::max<int64_t>(1, std::min(tasks / k_parts, N / kMinColumns));
  const int64_t half = K / 2 / 4 * 4;
  std::vector<float> second(k_parts == 2 ? rows * N : 0);  // the second K range's partial, [rows, N]
  const auto partial = bf16 ? Partial<uint16_t> : Partial<float>;
  const float* xs = x.typed_data();
  const void* ws = w.untyped_data();
  float *out = y->typed_data(), *other = second.data();
  RunTasks(pool, k_parts * n_parts, [=](int64_t t) {
    const int64_t kp = t / n_parts, np = t % n_parts;
    partial(rows, xs, ws, kp == 0 ? out : other, K, N, kp == 0 ? 0 : half, kp + 1 == k_parts ? K : half,
            N * np / n_parts, N * (np + 1) / n_parts);
  });
  for (size_t i = 0; i < second.size(); ++i) out[i] += second[i];
  return ffi::Error::Success();
}

// --- large products on oneDNN -------------------------------------------------------------------
//
// Products of many rows (a prefill, a training pass) on oneDNN's BLAS-like gemm functions where the
// oneDNN library is installed: row-major c[M, N] = op(a) @ op(b), float32 or bfloat16 operands (both
// the same), float32 sums and result, where XLA:CPU's products ran ~1.2x (float32) and ~3x (bfloat16)
// slower. (Its bfloat16 gemm ran at about AVX-512 BF16 speed on an AMX CPU, where cpu_amx.cc's GemmBf16
// takes the forward products: docs/benchmarks.md.) The
// result's columns go to XLA's thread pool in blocks, each a one-thread gemm (as fast as OpenMP's
// own team on two cores, and no second set of threads beside XLA's). The functions' addresses come
// from Python (`SetGemm`), so this library needs oneDNN neither to build nor to load.
typedef int (*SgemmFn)(char, char, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t,
                       float, float*, int64_t);
typedef int (*Bf16GemmFn)(char, char, int64_t, int64_t, int64_t, float, const uint16_t*, int64_t, const uint16_t*,
                          int64_t, float, float*, int64_t);
typedef void (*SetThreadsFn)(int);
SgemmFn sgemm = nullptr;
Bf16GemmFn bf16_gemm = nullptr;
SetThreadsFn set_omp_threads = nullptr;  // omp_set_num_threads: this thread's parallel regions

// a [M, K] ([K, M] with transpose_a), b [K, N] ([N, K] with transpose_b) -> c [M, N]
ffi::Error GemmImpl(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::ResultBuffer<ffi::F32> c,
                    bool transpose_a, bool transpose_b) {
  auto ad = a.dimensions(), bd = b.dimensions();
  if (ad.size() != 2 || bd.size() != 2 || a.element_type() != b.element_type())
    return ffi::Error::InvalidArgument("llava_next_gemm: want two matrices of one dtype");
  const int64_t M = transpose_a ? ad[1] : ad[0], K = transpose_a ? ad[0] : ad[1];
  const int64_t N = transpose_b ? bd[0] : bd[1];
  if ((transpose_b ? bd[1] : bd[0]) != K)
    return ffi::Error::InvalidArgument("llava_next_gemm: the operands' inner sizes differ");
  const char ta = transpose_a ? 'T' : 'N', tb = transpose_b ? 'T' : 'N';
  const int64_t lda = transpose_a ? M : K, ldb = transpose_b ? K : N;
  if (M == 0 || N == 0) return ffi::Error::Success();
  float* out = c->typed_data();
  if (K == 0) {
    std::fill(out, out + M * N, 0.0f);
    return ffi::Error::Success();
  }
  const bool bf16 = a.element_type() == ffi::DataType::BF16;
  if (!(bf16 ? bf16_gemm != nullptr : a.element_type() == ffi::DataType::F32 && sgemm != nullptr))
    return ffi::Error::InvalidArgument("llava_next_gemm: float32 or bfloat16 operands, with oneDNN set (SetGemm)");
  const int64_t size = bf16 ? 2 : 4;
  const void* bs = b.untyped_data();
  // Column blocks of the result (multiples of 64 columns), one task each: each task packs its own
  // columns of op(b) alone (splitting the rows instead packed all of op(b) once per task).
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), N / 64));
  std::vector<int> statuses(blocks, 0);
  int* status = statuses.data();
  RunTasks(pool, blocks, [=](int64_t t) {
    const int64_t n0 = N * t / blocks / 64 * 64, n1 = t + 1 == blocks ? N : N * (t + 1) / blocks / 64 * 64;
    if (set_omp_threads) set_omp_threads(1);
    const char* bt = static_cast<const char*>(bs) + (transpose_b ? n0 * K : n0) * size;  // op(b)'s columns n0..n1
    status[t] = bf16 ? bf16_gemm(ta, tb, M, n1 - n0, K, 1.0f, static_cast<const uint16_t*>(a.untyped_data()), lda,
                                 reinterpret_cast<const uint16_t*>(bt), ldb, 0.0f, out + n0, N)
                     : sgemm(ta, tb, M, n1 - n0, K, 1.0f, static_cast<const float*>(a.untyped_data()), lda,
                             reinterpret_cast<const float*>(bt), ldb, 0.0f, out + n0, N);
  });
  for (int s : statuses)
    if (s != 0) return ffi::Error::Internal("llava_next_gemm: oneDNN's gemm returned status " + std::to_string(s));
  return ffi::Error::Success();
}

// --- SiLU(gate) * up in bfloat16 -----------------------------------------------------------------
//
// out = silu(gate) * up for bfloat16 gate and up (n values): silu in float32 (gate * sigmoid(gate),
// the sigmoid from e^-|gate|) rounded to bf16 once, then the product rounded once, as PyTorch computes
// `act(gate) * up` in bf16. XLA:CPU's bf16 elementwise code ran it at ~6 GB/s (a mid-size bf16
// prefill: ~75 ms of ~700; docs/benchmarks.md). 16 values a step with AVX-512, else 8.
#ifdef __AVX512F__
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float FV __attribute__((vector_size(4 * kLanes)));
typedef uint32_t UV __attribute__((vector_size(4 * kLanes)));
typedef int32_t MV __attribute__((vector_size(4 * kLanes)));
typedef uint16_t HV __attribute__((vector_size(2 * kLanes)));

inline FV Widen(HV h) { return (FV)(__builtin_convertvector(h, UV) << 16); }

inline HV RoundToBf16(FV x) {  // to nearest even; a NaN stays a (quiet) NaN
  const UV bits = (UV)x;
  const UV rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const MV nan = (MV)((bits & 0x7fffffffu) > 0x7f800000u);
  return __builtin_convertvector((UV)(((MV)rounded & ~nan) | ((MV)((bits >> 16) | 0x40u) & nan)), HV);
}

inline HV SiluTimes(HV gate, HV up) {
  const FV g = Widen(gate), one = FV{} + 1.0f;
  const FV e = llava_next::Exp((FV)((UV)g | 0x80000000u));  // e^-|g| (Exp takes arguments <= 0)
  const MV negative = g < FV{};
  const FV sigmoid = (FV)(((MV)e & negative) | ((MV)one & ~negative)) / (one + e);
  return RoundToBf16(Widen(RoundToBf16(g * sigmoid)) * Widen(up));
}

void SiluMul(const uint16_t* gate, const uint16_t* up, uint16_t* out, int64_t n) {
  HV g, u, o;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    std::memcpy(&g, gate + i, sizeof g);
    std::memcpy(&u, up + i, sizeof u);
    o = SiluTimes(g, u);
    std::memcpy(out + i, &o, sizeof o);
  }
  if (i == n) return;
  const size_t bytes = (n - i) * sizeof(uint16_t);  // a last, partial step
  g = u = HV{};
  std::memcpy(&g, gate + i, bytes);
  std::memcpy(&u, up + i, bytes);
  o = SiluTimes(g, u);
  std::memcpy(out + i, &o, bytes);
}

ffi::Error SiluMulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> gate, ffi::Buffer<ffi::BF16> up,
                       ffi::ResultBuffer<ffi::BF16> out) {
  if (gate.element_count() != up.element_count())
    return ffi::Error::InvalidArgument("llava_next_silu_mul: gate and up differ in size");
  constexpr int64_t kPiece = 1 << 16;  // values per task
  const int64_t n = gate.element_count();
  const uint16_t *gs = gate.typed_data(), *us = up.typed_data();
  uint16_t* os = out->typed_data();
  RunTasks(pool, (n + kPiece - 1) / kPiece, [=](int64_t t) {
    const int64_t i = t * kPiece;
    SiluMul(gs + i, us + i, os + i, std::min(kPiece, n - i));
  });
  return ffi::Error::Success();
}

// A prompt's keys or values into its layer's cache: cache [B, K, H, S] (the result, in place where XLA
// aliases them) with update [B, K, T, H] written at slots [slot, slot + T), transposed in 16 x 16
// blocks (a cache line of each side at a time). XLA's dynamic_update_slice of the transposed update
// read the update a column at a time (a mid-size float32 prefill: ~66 ms; docs/benchmarks.md).
template <typename E>
void WriteTransposed(const E* update, E* cache, int64_t T, int64_t H, int64_t S, int64_t slot) {
  constexpr int64_t kBlock = 16;
  for (int64_t t0 = 0; t0 < T; t0 += kBlock)
    for (int64_t h0 = 0; h0 < H; h0 += kBlock)
      for (int64_t h = h0; h < std::min(H, h0 + kBlock); ++h)
        for (int64_t t = t0; t < std::min(T, t0 + kBlock); ++t) cache[h * S + slot + t] = update[t * H + h];
}

ffi::Error WriteCacheImpl(ffi::ThreadPool pool, ffi::AnyBuffer cache, ffi::AnyBuffer update,
                          ffi::Result<ffi::AnyBuffer> out, int64_t slot) {
  const auto cd = cache.dimensions(), ud = update.dimensions();
  const size_t size = ffi::ByteWidth(cache.element_type());
  if (cd.size() != 4 || ud.size() != 4 || cd[0] != ud[0] || cd[1] != ud[1] || cd[2] != ud[3] || slot < 0 ||
      slot + ud[2] > cd[3] || cache.element_type() != update.element_type() || (size != 2 && size != 4))
    return ffi::Error::InvalidArgument("llava_next_write_cache: want cache [B, K, H, S] and update [B, K, T, H] "
                                       "of one 2- or 4-byte dtype, slot + T <= S");
  if (out->untyped_data() != cache.untyped_data())
    std::memcpy(out->untyped_data(), cache.untyped_data(), cache.size_bytes());
  const int64_t pairs = cd[0] * cd[1], H = cd[2], S = cd[3], T = ud[2];
  char* to = static_cast<char*>(out->untyped_data());
  const char* from = static_cast<const char*>(update.untyped_data());
  RunTasks(pool, pairs, [=](int64_t i) {
    if (size == 4)
      WriteTransposed(reinterpret_cast<const uint32_t*>(from) + i * T * H, reinterpret_cast<uint32_t*>(to) + i * H * S,
                      T, H, S, slot);
    else
      WriteTransposed(reinterpret_cast<const uint16_t*>(from) + i * T * H, reinterpret_cast<uint16_t*>(to) + i * H * S,
                      T, H, S, slot);
  });
  return ffi::Error::Success();
}

// y = x, bytes for bytes: XLA does not fuse what computes x into x's users through a custom call, so
// x is computed once, whole (XLA:CPU fused the RoPE tables' cos and sin into every layer's rotation
// and evaluated them there, per head; `cpu_kernels.materialize`).
ffi::Error CopyImpl(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  if (x.size_bytes() != y->size_bytes()) return ffi::Error::InvalidArgument("llava_next_copy: sizes differ");
  std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

// out[i] = table[ids[i]] (rows of table [V, D], any element type; ids int32, a negative one counted
// from the end, as jnp indexing does, then clamped to [0, V - 1], as XLA's gather does). A bf16 table
// gathered by XLA:CPU was converted whole first (to float32, or copied to uint16 for a gather of its
// bits), and inside a decode loop that conversion was hoisted out of it: a copy of the table per call.
ffi::Error TakeRowsImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::S32> ids, ffi::Result<ffi::AnyBuffer> out) {
  const auto td = table.dimensions();
  if (td.size() != 2 || td[0] < 1 || out->size_bytes() != ids.element_count() * (table.size_bytes() / td[0]))
    return ffi::Error::InvalidArgument("llava_next_take_rows: want table [V, D] (V >= 1), ids [n], out [n, D]");
  const int64_t V = td[0], row_bytes = table.size_bytes() / V;
  const char* from = static_cast<const char*>(table.untyped_data());
  char* to = static_cast<char*>(out->untyped_data());
  const int32_t* index = ids.typed_data();
  for (int64_t i = 0, n = ids.element_count(); i < n; ++i) {
    const int64_t row = std::clamp<int64_t>(index[i] < 0 ? index[i] + V : index[i], 0, V - 1);
    std::memcpy(to + i * row_bytes, from + row * row_bytes, row_bytes);
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" void SetGemm(void* float32_gemm, void* bfloat16_gemm, void* omp_set_num_threads) {
  sgemm = reinterpret_cast<SgemmFn>(float32_gemm);
  bf16_gemm = reinterpret_cast<Bf16GemmFn>(bfloat16_gemm);
  set_omp_threads = reinterpret_cast<SetThreadsFn>(omp_set_num_threads);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(Gemm, GemmImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmul, FewRowMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tasks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Copy, CopyImpl, ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(TakeRows, TakeRowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()           // table
                                  .Arg<ffi::Buffer<ffi::S32>>()    // ids
                                  .Ret<ffi::AnyBuffer>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(WriteCache, WriteCacheImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()    // cache
                                  .Arg<ffi::AnyBuffer>()    // update
                                  .Ret<ffi::AnyBuffer>()    // the cache written
                                  .Attr<int64_t>("slot"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiluMulBf16, SiluMulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // gate
                                  .Arg<ffi::Buffer<ffi::BF16>>()   // up
                                  .Ret<ffi::Buffer<ffi::BF16>>());
