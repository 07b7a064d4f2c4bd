// Few-row matmul for XLA:CPU: y[R, N] = x[R, K] @ w[K, N] with 1 <= R <= 8 (a decode step), x and y
// float32, the weight kernel w float32 or bfloat16 (widened to float32 as it is read; float32 sums).
//
// XLA:CPU runs such a product as a general matmul that packs the kernel before multiplying, and a
// bfloat16 kernel it first converts to float32 in memory; a decode step is all streaming of
// weights, and both cost about half the speed of it. Here the
// kernel is read once, in order: the K rows are split into one contiguous range per thread, each
// range's rows are streamed four at a time into a partial y[R, N] (small enough to stay in cache),
// and the partials are summed. Built and loaded by llava_next_jax/cpu_kernels.py; the loops are
// plain C++ that the compiler vectorises (-O3 -march=native).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 8;

inline float Widen(float v) { return v; }
inline float Widen(uint16_t bf16) {  // bfloat16 is the high half of a float32
  const uint32_t bits = uint32_t(bf16) << 16;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// y[R, N] = x[:, k0:k1] @ w[k0:k1, :]; `x` is [R, K] with row stride K.
template <int R, typename W>
void Partial(const float* __restrict x, const void* weights, float* __restrict y, int64_t K,
             int64_t N, int64_t k0, int64_t k1) {
  const W* __restrict w = static_cast<const W*>(weights);
  std::fill(y, y + R * N, 0.0f);
  int64_t k = k0;
  for (; k + 4 <= k1; k += 4) {
    const W* __restrict w0 = w + k * N;
    const W* __restrict w1 = w0 + N;
    const W* __restrict w2 = w1 + N;
    const W* __restrict w3 = w2 + N;
    float a[R], b[R], c[R], d[R];
    for (int r = 0; r < R; ++r) {
      a[r] = x[r * K + k];
      b[r] = x[r * K + k + 1];
      c[r] = x[r * K + k + 2];
      d[r] = x[r * K + k + 3];
    }
    for (int64_t n = 0; n < N; ++n) {
      const float u = Widen(w0[n]), v = Widen(w1[n]), s = Widen(w2[n]), t = Widen(w3[n]);
      for (int r = 0; r < R; ++r) y[r * N + n] += (a[r] * u + b[r] * v) + (c[r] * s + d[r] * t);
    }
  }
  for (; k < k1; ++k) {
    const W* __restrict w0 = w + k * N;
    for (int r = 0; r < R; ++r) {
      const float a = x[r * K + k];
      for (int64_t n = 0; n < N; ++n) y[r * N + n] += a * Widen(w0[n]);
    }
  }
}

using PartialFn = void (*)(const float*, const void*, float*, int64_t, int64_t, int64_t, int64_t);
template <typename W>
constexpr PartialFn kPartials[kMaxRows] = {Partial<1, W>, Partial<2, W>, Partial<3, W>, Partial<4, W>,
                                           Partial<5, W>, Partial<6, W>, Partial<7, W>, Partial<8, W>};

// One call's work: `parts` contiguous ranges of K, claimed by whichever thread comes first (the
// caller included, so the call finishes even when every pool thread is busy elsewhere).
struct Job {
  PartialFn partial;
  const float* x;
  const void* w;
  float* y;
  int64_t rows, K, N, parts;
  std::vector<float> scratch;  // partials of ranges 1.., [parts - 1, rows, N]
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t p; (p = next.fetch_add(1)) < parts;) {
      int64_t k0 = K * p / parts / 4 * 4, k1 = p + 1 == parts ? K : K * (p + 1) / parts / 4 * 4;
      float* out = p == 0 ? y : scratch.data() + (p - 1) * rows * N;
      partial(x, w, out, K, N, k0, k1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error FewRowMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                            ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), wd = w.dimensions();
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[0] || xd[0] < 1 || xd[0] > kMaxRows)
    return ffi::Error::InvalidArgument("llava_next_fewrow_matmul: want x [R <= 8, K] and w [K, N]");
  if (!bf16 && w.element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("llava_next_fewrow_matmul: w must be float32 or bfloat16");
  const int64_t rows = xd[0], K = xd[1], N = wd[1];
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), K / 64));
  auto job = std::make_shared<Job>();
  job->partial = (bf16 ? kPartials<uint16_t> : kPartials<float>)[rows - 1];
  job->x = x.typed_data();
  job->w = w.untyped_data();
  job->y = y->typed_data();
  job->rows = rows;
  job->K = K;
  job->N = N;
  job->parts = parts;
  job->scratch.resize((parts - 1) * rows * N);
  for (int64_t i = 1; i < parts; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
  float* out = job->y;
  for (int64_t p = 1; p < parts; ++p) {
    const float* part = job->scratch.data() + (p - 1) * rows * N;
    for (int64_t i = 0; i < rows * N; ++i) out[i] += part[i];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmul, FewRowMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
