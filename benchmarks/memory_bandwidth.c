/* The memory bandwidth a batch-1 decode step on the CPU is held to: a plain C loop that sums a large
 * float32 array (nothing but reads, 32 running sums per thread), best of 5, per thread count.
 *
 *     gcc -O3 -march=native -fopenmp benchmarks/memory_bandwidth.c -o /tmp/bw && /tmp/bw [MB]
 *
 * MB defaults to 640, about what one float32 decode step of the mid-size config reads (the weights
 * once, the lm_head, the cache), so that no cache level holds it. docs/benchmarks.md uses the figure. */
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
  size_t n = (size_t)((argc > 1 ? atof(argv[1]) : 640) * 1e6 / 4) / 32 * 32;
  float *a = aligned_alloc(64, n * sizeof(float));
#pragma omp parallel for
  for (size_t i = 0; i < n; i++) a[i] = 1.0f;
  for (int threads = 1; threads <= omp_get_num_procs(); threads++) {
    double best = 0, total = 0;
    for (int rep = 0; rep < 5; rep++) {
      double t = now(), sum = 0;
#pragma omp parallel num_threads(threads) reduction(+ : sum)
      {
        float lanes[32] = {0};  /* 32 independent sums: the compiler keeps them in 4 vector registers */
#pragma omp for
        for (size_t i = 0; i < n; i += 32)
          for (int j = 0; j < 32; j++) lanes[j] += a[i + j];
        for (int j = 0; j < 32; j++) sum += lanes[j];
      }
      double rate = n * sizeof(float) / (now() - t) / 1e9;
      best = rate > best ? rate : best;
      total += sum;
    }
    printf("%d thread(s): %.1f GB/s read (best of 5 over %.0f MB; checksum %.0f)\n", threads, best,
           n * sizeof(float) / 1e6, total);
  }
  free(a);
  return 0;
}
