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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FewRowMatmul, FewRowMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("tasks"));
