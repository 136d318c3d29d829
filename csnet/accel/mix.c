/* The cross-stitch unit's CPU kernel (csnet/accel/build.py compiles and loads it).
 *
 * out_i[n, c, k] = sum_j w[i, j, c] * x_j[n, c, k]   (Misra et al., CVPR 2016, section 3.2)
 *
 * Every task's activation is viewed as a contiguous (N, C, K) array: channels-last maps and
 * (B, C) rows are (rows, C, 1); NCHW maps are (B, C, H*W). The kernel reads each of the T
 * inputs once and writes each of the T outputs once. Done with tensor ops, every target
 * reads every source: T^2 passes over memory, which made an 8-task network about 19% slower
 * than its columns alone (issue 6 asks for at most 15%).
 *
 * The backward pass is one pass too: while a row's T gradients and T inputs are in
 * registers it writes the T input gradients and adds the T x T weight-gradient products
 * into per-thread partial sums. Those are float over at most FLUSH rows, then double, so
 * a sum over 25,000 positions keeps float32's precision.
 *
 * Vectors are GCC/Clang vector extensions of 16 floats: the compiler maps them to one
 * AVX-512 register, two AVX2 ones or four NEON ones, whatever -march=native finds.
 */
#include <string.h>
#include <omp.h>

#define V 16
typedef float vf __attribute__((vector_size(V * sizeof(float)), aligned(sizeof(float))));

#define FLUSH 64         /* rows summed in float before the partial sums go into double */
#define BLOCK_FLOATS 4096 /* 16 KiB: the weights of one channel block stay in L1 while rows stream by */

/* Channels per block: all T x T weights of the block fit in BLOCK_FLOATS (C = 1024 after fc). */
static long channel_block(int T, long C) {
  long cb = BLOCK_FLOATS / ((long)T * T) / V * V;
  return cb < V ? V : (cb > C ? C : cb);
}

/* This thread's share [n0, n1) of N rows, in contiguous runs so each thread streams its own memory. */
static void thread_rows(long N, long *n0, long *n1) {
  long t = omp_get_thread_num(), p = omp_get_num_threads(), per = N / p, extra = N % p;
  *n0 = t * per + (t < extra ? t : extra);
  *n1 = *n0 + per + (t < extra);
}

/* Rows [n0, n1), channels [c0, c1) of outs[i] = sum_j w[i, j, :] * xs[j], for (N, C, 1) arrays. */
static void mix_rows(int T, const float *const *xs, float *const *outs, const float *w, long C,
                     long n0, long n1, long c0, long c1) {
  vf xv[T];
  for (long n = n0; n < n1; n++) {
    long row = n * C, c = c0;
    for (; c + V <= c1; c += V) {
      for (int j = 0; j < T; j++) xv[j] = *(const vf *)(xs[j] + row + c);
      for (int i = 0; i < T; i++) {
        const float *wi = w + (long)i * T * C + c;
        vf acc = *(const vf *)wi * xv[0];
        for (int j = 1; j < T; j++) acc += *(const vf *)(wi + (long)j * C) * xv[j];
        *(vf *)(outs[i] + row + c) = acc;
      }
    }
    for (; c < c1; c++)
      for (int i = 0; i < T; i++) {
        float acc = 0.f;
        for (int j = 0; j < T; j++) acc += w[((long)i * T + j) * C + c] * xs[j][row + c];
        outs[i][row + c] = acc;
      }
  }
}

/* One (n, c) run of K values of outs[i] = sum_j w[i, j, c] * xs[j], for (N, C, K) arrays. */
static void mix_run(int T, const float *const *xs, float *const *outs, const float *w, long C, long c,
                    long base, long K) {
  vf xv[T];
  long k = 0;
  for (; k + V <= K; k += V) {
    for (int j = 0; j < T; j++) xv[j] = *(const vf *)(xs[j] + base + k);
    for (int i = 0; i < T; i++) {
      vf acc = w[(long)i * T * C + c] * xv[0];
      for (int j = 1; j < T; j++) acc += w[((long)i * T + j) * C + c] * xv[j];
      *(vf *)(outs[i] + base + k) = acc;
    }
  }
  for (; k < K; k++)
    for (int i = 0; i < T; i++) {
      float acc = 0.f;
      for (int j = 0; j < T; j++) acc += w[((long)i * T + j) * C + c] * xs[j][base + k];
      outs[i][base + k] = acc;
    }
}

void csnet_mix_forward(int T, const float *const *xs, float *const *outs, const float *w,
                       long N, long C, long K, int threads) {
  if (K == 1) {
    long cb = channel_block(T, C);
    #pragma omp parallel num_threads(threads)
    {
      long n0, n1;
      thread_rows(N, &n0, &n1);
      for (long c0 = 0; c0 < C; c0 += cb) mix_rows(T, xs, outs, w, C, n0, n1, c0, c0 + cb < C ? c0 + cb : C);
    }
    return;
  }
  #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (long n = 0; n < N; n++)
    for (long c = 0; c < C; c++) mix_run(T, xs, outs, w, C, c, (n * C + c) * K, K);
}

/* Rows [n0, n1), channels [c0, c1), (N, C, 1) arrays: gxs[j] = sum_i wt[j, i, :] * gs[i] (when gxs)
 * and part[i, j, :] += gs[i] * xs[j] summed over the rows (when part), from one read of each row. */
static void backward_rows(int T, const float *const *gs, const float *const *xs, float *const *gxs, float *part,
                          const float *wt, long C, long n0, long n1, long c0, long c1) {
  vf gv[T], xv[T];
  for (long n = n0; n < n1; n++) {
    long row = n * C, c = c0;
    for (; c + V <= c1; c += V) {
      for (int i = 0; i < T; i++) gv[i] = *(const vf *)(gs[i] + row + c);
      if (gxs)
        for (int j = 0; j < T; j++) {
          const float *wj = wt + (long)j * T * C + c;
          vf acc = *(const vf *)wj * gv[0];
          for (int i = 1; i < T; i++) acc += *(const vf *)(wj + (long)i * C) * gv[i];
          *(vf *)(gxs[j] + row + c) = acc;
        }
      if (part) {
        for (int j = 0; j < T; j++) xv[j] = *(const vf *)(xs[j] + row + c);
        for (int i = 0; i < T; i++) {
          float *p = part + (long)i * T * C + c;
          for (int j = 0; j < T; j++) *(vf *)(p + (long)j * C) += gv[i] * xv[j];
        }
      }
    }
    for (; c < c1; c++) {
      if (gxs)
        for (int j = 0; j < T; j++) {
          float acc = 0.f;
          for (int i = 0; i < T; i++) acc += wt[((long)j * T + i) * C + c] * gs[i][row + c];
          gxs[j][row + c] = acc;
        }
      if (part)
        for (int i = 0; i < T; i++)
          for (int j = 0; j < T; j++) part[((long)i * T + j) * C + c] += gs[i][row + c] * xs[j][row + c];
    }
  }
}

/* One (n, c) run of K values, (N, C, K) arrays: gxs as above, and the run's T x T sums of
 * gs[i] * xs[j] added into tot[i, j, c] (when tot). */
static void backward_run(int T, const float *const *gs, const float *const *xs, float *const *gxs, double *tot,
                         const float *wt, long C, long c, long base, long K) {
  vf gv[T], xv[T], acc[tot ? T * T : 1];
  float tail[tot ? T * T : 1];
  if (tot) for (int q = 0; q < T * T; q++) { acc[q] = (vf){0}; tail[q] = 0.f; }
  long k = 0;
  for (; k + V <= K; k += V) {
    for (int i = 0; i < T; i++) gv[i] = *(const vf *)(gs[i] + base + k);
    if (gxs)
      for (int j = 0; j < T; j++) {
        vf s = wt[(long)j * T * C + c] * gv[0];
        for (int i = 1; i < T; i++) s += wt[((long)j * T + i) * C + c] * gv[i];
        *(vf *)(gxs[j] + base + k) = s;
      }
    if (tot) {
      for (int j = 0; j < T; j++) xv[j] = *(const vf *)(xs[j] + base + k);
      for (int i = 0; i < T; i++)
        for (int j = 0; j < T; j++) acc[i * T + j] += gv[i] * xv[j];
    }
  }
  for (; k < K; k++) {
    if (gxs)
      for (int j = 0; j < T; j++) {
        float s = 0.f;
        for (int i = 0; i < T; i++) s += wt[((long)j * T + i) * C + c] * gs[i][base + k];
        gxs[j][base + k] = s;
      }
    if (tot)
      for (int i = 0; i < T; i++)
        for (int j = 0; j < T; j++) tail[i * T + j] += gs[i][base + k] * xs[j][base + k];
  }
  if (tot)
    for (int q = 0; q < T * T; q++) {
      float s = tail[q];
      for (int l = 0; l < V; l++) s += acc[q][l];
      tot[(long)q * C + c] += s;
    }
}

/* wt is w transposed (wt[j, i, c] = w[i, j, c]): the input gradient is the forward mix with it.
 * gxs or gw may be NULL when that gradient is not needed; gw is (T, T, C) double. Each thread
 * sums its own rows, and the threads' sums are added in thread order, so a run repeats bit for
 * bit with the same number of threads. The caller passes the threads' zeroed sums (tots,
 * threads x T x T x C doubles, and parts, as many floats) so that running out of memory is a
 * Python error, not a crash here. */
void csnet_mix_backward(int T, const float *const *gs, const float *const *xs, float *const *gxs, double *gw,
                        const float *wt, long N, long C, long K, double *tots, float *parts, int threads) {
  long TTC = (long)T * T * C;
  int used = 1;
  #pragma omp parallel num_threads(threads)
  {
    double *tot = gw ? tots + omp_get_thread_num() * TTC : NULL;
    #pragma omp single
    used = omp_get_num_threads();
    if (K == 1) {
      float *part = gw ? parts + omp_get_thread_num() * TTC : NULL;
      long n0, n1, cb = channel_block(T, C);
      thread_rows(N, &n0, &n1);
      for (long c0 = 0; c0 < C; c0 += cb) {
        long c1 = c0 + cb < C ? c0 + cb : C;
        for (long r = n0; r < n1; r += FLUSH) {
          backward_rows(T, gs, xs, gxs, part, wt, C, r, r + FLUSH < n1 ? r + FLUSH : n1, c0, c1);
          if (part)
            for (long q = 0; q < (long)T * T; q++)
              for (long c = c0; c < c1; c++) { tot[q * C + c] += part[q * C + c]; part[q * C + c] = 0.f; }
        }
      }
    } else {
      #pragma omp for collapse(2) schedule(static)
      for (long n = 0; n < N; n++)
        for (long c = 0; c < C; c++) backward_run(T, gs, xs, gxs, tot, wt, C, c, (n * C + c) * K, K);
    }
  }
  if (gw) {
    memset(gw, 0, TTC * sizeof(double));
    for (int t = 0; t < used; t++)
      for (long q = 0; q < TTC; q++) gw[q] += tots[t * TTC + q];
  }
}
