// Few-row matmul for XLA:CPU: y[R, N] = x[R, K] @ w[K, N] with 1 <= R <= 8 (a decode step), x and y
// float32, the weight kernel w float32 or bfloat16 (widened to float32 as it is read; float32 sums).
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
#include <vector>

#include "xla/ffi/api/ffi.h"
#include "cpu_tasks.h"

namespace ffi = xla::ffi;

namespace {

using llava_next::RunTasks;

constexpr int kMaxRows = 8;
constexpr int64_t kMinColumns = 256;  // a task reads runs of at least 1 KiB (float32) per weight row

inline float Widen(float v) { return v; }
inline float Widen(uint16_t bf16) {  // bfloat16 is the high half of a float32
  const uint32_t bits = uint32_t(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// y[:Q, c0:c1] += x[:Q, k:k+4] @ w[k:k+4, c0:c1] for Q <= 4 rows; x is [., K], w [K, N] and y [., N],
// row-major. The rows' 16 factors, the 4 weights and an accumulator fit the vector registers, so the
// compiler vectorises the column loop (with more rows it spilled and ran ~8x slower).
template <int Q, typename W>
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
  for (int64_t n = c0; n < c1; ++n) {
    const float u = Widen(w0[n]), v = Widen(w1[n]), s = Widen(w2[n]), t = Widen(w3[n]);
    for (int r = 0; r < Q; ++r) y[r * N + n] += (a[r] * u + b[r] * v) + (c[r] * s + d[r] * t);
  }
}

// y[:, n0:n1] = x[:, k0:k1] @ w[k0:k1, n0:n1]; x is [R, K], w [K, N] and y [R, N], row-major. The
// weights are read front to back, four rows at a time; more than four rows of x take them in groups
// of four over column chunks of kChunk, so a chunk read from memory once is re-read from L1.
constexpr int64_t kChunk = 512;

template <int R, typename W>
void Partial(const float* __restrict x, const void* weights, float* __restrict y, int64_t K,
             int64_t N, int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  const W* __restrict w = static_cast<const W*>(weights);
  for (int r = 0; r < R; ++r) std::fill(y + r * N + n0, y + r * N + n1, 0.0f);
  const int64_t chunk = R <= 4 ? n1 - n0 : kChunk;
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    for (int64_t c0 = n0; c0 < n1; c0 += chunk) {
      const int64_t c1 = std::min(n1, c0 + chunk);
      FourRows<(R < 4 ? R : 4), W>(x, w, y, K, N, k, c0, c1);
      if constexpr (R > 4) FourRows<R - 4, W>(x + 4 * K, w, y + 4 * N, K, N, k, c0, c1);
    }
  }
  for (; k < k1; ++k) {
    const W* __restrict w0 = w + k * N;
    for (int r = 0; r < R; ++r) {
      const float a = x[r * K + k];
      for (int64_t n = n0; n < n1; ++n) y[r * N + n] += a * Widen(w0[n]);
    }
  }
}

using PartialFn = void (*)(const float*, const void*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                          int64_t);
template <typename W>
constexpr PartialFn kPartials[kMaxRows] = {Partial<1, W>, Partial<2, W>, Partial<3, W>, Partial<4, W>,
                                           Partial<5, W>, Partial<6, W>, Partial<7, W>, Partial<8, W>};

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
  const PartialFn partial = (bf16 ? kPartials<uint16_t> : kPartials<float>)[rows - 1];
  const float* xs = x.typed_data();
  const void* ws = w.untyped_data();
  float *out = y->typed_data(), *other = second.data();
  RunTasks(pool, k_parts * n_parts, [=](int64_t t) {
    const int64_t kp = t / n_parts, np = t % n_parts;
    partial(xs, ws, kp == 0 ? out : other, K, N, kp == 0 ? 0 : half, kp + 1 == k_parts ? K : half,
            N * np / n_parts, N * (np + 1) / n_parts);
  });
  for (size_t i = 0; i < second.size(); ++i) out[i] += second[i];
  return ffi::Error::Success();
}

// y[R, N] = x[R, K] @ w[N, K]^T: each output a dot product along contiguous rows, 8 running sums
// per row of x (the compiler keeps them in one vector register each), two rows of w at a time.
template <int R>
void DotsTransposed(const float* __restrict x, const float* __restrict w, float* __restrict y, int64_t K,
                    int64_t N) {
  const int64_t K8 = K / 8 * 8;
  auto finish = [&](const float (&acc)[R][8], const float* __restrict wn, int64_t n) {
    for (int r = 0; r < R; ++r) {
      float sum = 0.0f;
      for (int j = 0; j < 8; ++j) sum += acc[r][j];
      for (int64_t k = K8; k < K; ++k) sum += x[r * K + k] * wn[k];
      y[r * N + n] = sum;
    }
  };
  int64_t n = 0;
  for (; n + 2 <= N; n += 2) {
    const float* __restrict w0 = w + n * K;
    const float* __restrict w1 = w0 + K;
    float a[R][8] = {}, b[R][8] = {};
    for (int64_t k = 0; k < K8; k += 8)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 8; ++j) {
          a[r][j] += x[r * K + k + j] * w0[k + j];
          b[r][j] += x[r * K + k + j] * w1[k + j];
        }
    finish(a, w0, n);
    finish(b, w1, n + 1);
  }
  for (; n < N; ++n) {
    const float* __restrict w0 = w + n * K;
    float a[R][8] = {};
    for (int64_t k = 0; k < K8; k += 8)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 8; ++j) a[r][j] += x[r * K + k + j] * w0[k + j];
    finish(a, w0, n);
  }
}

template <int R>
void HeadProduct(const float* x, const float* w, float* y, int64_t K, int64_t N, bool transposed) {
  if (transposed) {
    DotsTransposed<R>(x, w, y, K, N);
  } else {
    Partial<R, float>(x, w, y, K, N, 0, K, 0, N);
  }
}

using HeadFn = void (*)(const float*, const float*, float*, int64_t, int64_t, bool);
constexpr HeadFn kHeads[kMaxRows] = {HeadProduct<1>, HeadProduct<2>, HeadProduct<3>, HeadProduct<4>,
                                     HeadProduct<5>, HeadProduct<6>, HeadProduct<7>, HeadProduct<8>};

// A decode step's attention products, one per (row, kv head) pair p: y[p] = x[p] @ w[p] (w [P, K, N],
// the query logits over the keys) or x[p] @ w[p]^T (w [P, N, K], the output from the values), x
// [P, R, K] with R <= 8 (a kv head's query heads). Each pair is a task.
ffi::Error HeadMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                          ffi::ResultBuffer<ffi::F32> y, bool transposed) {
  auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 3 || wd.size() != 3 || xd[0] != wd[0] || xd[1] < 1 || xd[1] > kMaxRows ||
      xd[2] != wd[transposed ? 2 : 1])
    return ffi::Error::InvalidArgument("llava_next_head_matmul: want x [P, R <= 8, K] and w [P, K, N] "
                                       "(transposed: [P, N, K])");
  const int64_t pairs = xd[0], R = xd[1], K = xd[2], N = transposed ? wd[1] : wd[2];
  const HeadFn product = kHeads[R - 1];
  const float *xs = x.typed_data(), *ws = w.typed_data();
  float* out = y->typed_data();
  RunTasks(pool, pairs, [=](int64_t p) {
    product(xs + p * R * K, ws + p * K * N, out + p * R * N, K, N, transposed);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(HeadMatmul, HeadMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmul, FewRowMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tasks"));
