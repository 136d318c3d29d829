/* Batch norm -> 2x2 max-pool -> ReLU fused, for the convnet column's conv blocks
 * (csnet/models/columns.py, the Fashion-MNIST column of CONTEXT.md's experiment 1), on
 * channels-last float32 maps on the CPU. csnet/models/native.py compiles and loads it.
 *
 * Why: after the matrix products, these three layers were the costliest part of a training
 * step of the Fashion pair (about 17 of 92 ms), all of it memory traffic. As separate ops
 * they read and write the full-size conv output about nine times per step (batch-norm
 * statistics, normalise, pool, pool's backward zero-fill and scatter, batch-norm backward's
 * two reductions and its output) and keep int64 pool indices. Here the forward pass reads
 * the conv output twice (statistics, then normalise + pool + ReLU) and writes a quarter-size
 * output (plus a byte and a float per output for the backward pass); the backward pass sums
 * over quarter-size arrays, then reads the conv output and writes its gradient once.
 *
 * Layout: y is (B, H, W, C) in memory (channels last), out (B, H/2, W/2, C). Pooling windows
 * are 2x2 with stride 2, rounding down (nn.MaxPool2d(2)): odd last rows and columns feed only
 * the batch statistics. For the backward pass the forward keeps, per output value, which of
 * its window's four inputs won (0..3, or 4 where the ReLU zeroed it) and that input's value.
 *
 * Sums are double. Each thread sums its own rows and the threads' sums are added in thread
 * order, so a run repeats bit for bit with the same number of threads.
 */
#include <string.h>
#include <omp.h>

#define DROPPED 4 /* winner code of an output the ReLU zeroed: no gradient flows back */

/* This thread's share [r0, r1) of R rows, in contiguous runs. */
static void share(long R, long *r0, long *r1) {
  long t = omp_get_thread_num(), p = omp_get_num_threads(), per = R / p, extra = R % p;
  *r0 = t * per + (t < extra ? t : extra);
  *r1 = *r0 + per + (t < extra);
}

/* first[c], second[c] = the threads' two per-channel sums (parts: used x 2C), added in thread order. */
static void add_in_order(const double *restrict parts, int used, long C, double *restrict first,
                         double *restrict second) {
  memset(first, 0, C * sizeof(double));
  memset(second, 0, C * sizeof(double));
  for (int t = 0; t < used; t++)
    for (long c = 0; c < C; c++) {
      first[c] += parts[(long)t * 2 * C + c];
      second[c] += parts[(long)t * 2 * C + C + c];
    }
}

/* Per-channel sum and sum of squares of y, viewed as (M, C). parts: threads x 2C zeroed doubles
 * from the caller (so that running out of memory is a Python error), the threads' own sums. */
void csnet_bn_stats(const float *restrict y, long M, long C, double *restrict sum, double *restrict sumsq,
                    double *restrict parts, int threads) {
  int used = 1;
  #pragma omp parallel num_threads(threads)
  {
    double *s = parts + (long)omp_get_thread_num() * 2 * C, *q = s + C;
    long r0, r1;
    #pragma omp single
    used = omp_get_num_threads();
    share(M, &r0, &r1);
    for (long r = r0; r < r1; r++) {
      const float *row = y + r * C;
      for (long c = 0; c < C; c++) {
        double v = row[c];
        s[c] += v;
        q[c] += v * v;
      }
    }
  }
  add_in_order(parts, used, C, sum, sumsq);
}

/* One output pixel's C channels from its window's four input pixels p0..p3. Written as selects,
 * not branches, so the compiler vectorises across channels. A NaN wins its window and passes the
 * ReLU, as in torch, so a diverging run still shows NaN. */
static inline void pool_pixel(const float *restrict p0, const float *restrict p1, const float *restrict p2,
                              const float *restrict p3, const float *restrict scale, const float *restrict shift,
                              float *restrict out, unsigned char *restrict winner, float *restrict picked, long C) {
  for (long c = 0; c < C; c++) {
    float v0 = p0[c] * scale[c] + shift[c], v1 = p1[c] * scale[c] + shift[c];
    float v2 = p2[c] * scale[c] + shift[c], v3 = p3[c] * scale[c] + shift[c];
    int m1 = v1 > v0 || v1 != v1;
    float best = m1 ? v1 : v0, raw = m1 ? p1[c] : p0[c];
    int arg = m1;
    int m2 = v2 > best || v2 != v2;
    best = m2 ? v2 : best; raw = m2 ? p2[c] : raw; arg = m2 ? 2 : arg;
    int m3 = v3 > best || v3 != v3;
    best = m3 ? v3 : best; raw = m3 ? p3[c] : raw; arg = m3 ? 3 : arg;
    out[c] = best <= 0.f ? 0.f : best;
    winner[c] = (unsigned char)(best <= 0.f ? DROPPED : arg);
    picked[c] = raw;
  }
}

static inline void pool_pixel_eval(const float *restrict p0, const float *restrict p1, const float *restrict p2,
                                   const float *restrict p3, const float *restrict scale,
                                   const float *restrict shift, float *restrict out, long C) {
  for (long c = 0; c < C; c++) {
    float v0 = p0[c] * scale[c] + shift[c], v1 = p1[c] * scale[c] + shift[c];
    float v2 = p2[c] * scale[c] + shift[c], v3 = p3[c] * scale[c] + shift[c];
    float best = v1 > v0 || v1 != v1 ? v1 : v0;
    best = v2 > best || v2 != v2 ? v2 : best;
    best = v3 > best || v3 != v3 ? v3 : best;
    out[c] = best <= 0.f ? 0.f : best;
  }
}

/* out = ReLU(max over each 2x2 window of y * scale + shift), scale and shift per channel (batch
 * norm folded). winner and picked (the winning input's raw value) are NULL in evaluation. */
void csnet_bn_pool_relu_forward(const float *restrict y, float *restrict out, unsigned char *restrict winner,
                                float *restrict picked, const float *restrict scale, const float *restrict shift,
                                long B, long H, long W, long C, int threads) {
  long OH = H / 2, OW = W / 2;
  #pragma omp parallel num_threads(threads)
  {
    long r0, r1;
    share(B * OH, &r0, &r1);
    for (long r = r0; r < r1; r++) {
      long b = r / OH, oh = r % OH;
      for (long ow = 0; ow < OW; ow++) {
        const float *p0 = y + ((b * H + 2 * oh) * W + 2 * ow) * C, *p2 = p0 + W * C;
        long o = (r * OW + ow) * C;
        if (winner)
          pool_pixel(p0, p0 + C, p2, p2 + C, scale, shift, out + o, winner + o, picked + o, C);
        else
          pool_pixel_eval(p0, p0 + C, p2, p2 + C, scale, shift, out + o, C);
      }
    }
  }
}

/* Gradient of the forward pass. gout, winner, picked: (B, H/2, W/2, C); y, dy: (B, H, W, C).
 * With batch statistics (batch_stats != 0) dy carries batch norm's two mean terms; with running
 * statistics (a frozen norm) it is dz * gamma * invstd alone. Returns, per channel,
 * dbeta = sum of dz and dgamma = sum of dz * xhat, where dz is the gradient at batch norm's output.
 * Scratch from the caller: parts (threads x 2C zeroed doubles) and coef (3C floats). */
void csnet_bn_pool_relu_backward(const float *restrict gout, const unsigned char *restrict winner,
                                 const float *restrict picked, const float *restrict y, float *restrict dy,
                                 const float *restrict mean, const float *restrict invstd,
                                 const float *restrict gamma, int batch_stats, long B, long H, long W, long C,
                                 double *restrict dbeta, double *restrict dgamma, double *restrict parts,
                                 float *restrict coef, int threads) {
  long OH = H / 2, OW = W / 2, M = B * H * W;
  float *a = coef, *mdz = coef + C, *mdzx = coef + 2 * C;
  int used = 1;
  #pragma omp parallel num_threads(threads)
  {
    double *s = parts + (long)omp_get_thread_num() * 2 * C, *q = s + C;
    long r0, r1;
    #pragma omp single
    used = omp_get_num_threads();
    share(B * OH * OW, &r0, &r1);
    for (long r = r0; r < r1; r++) {
      const float *g = gout + r * C, *v = picked + r * C;
      const unsigned char *k = winner + r * C;
      for (long c = 0; c < C; c++) {
        float dz = k[c] == DROPPED ? 0.f : g[c];
        s[c] += dz;
        q[c] += (double)dz * ((v[c] - mean[c]) * invstd[c]);
      }
    }
    #pragma omp barrier
    #pragma omp single
    {
      add_in_order(parts, used, C, dbeta, dgamma);
      for (long c = 0; c < C; c++) {
        a[c] = gamma[c] * invstd[c];
        mdz[c] = batch_stats ? (float)(dbeta[c] / M) : 0.f;
        mdzx[c] = batch_stats ? (float)(dgamma[c] / M) : 0.f;
      }
    }  /* implicit barrier: every thread sees the totals */
    share(B * H, &r0, &r1);
    for (long r = r0; r < r1; r++) {
      long b = r / H, h = r % H, oh = h / 2;
      int pooled_row = oh < OH;
      for (long w = 0; w < W; w++) {
        long i = (r * W + w) * C, ow = w / 2;
        int pooled = pooled_row && ow < OW;
        long o = ((b * OH + oh) * OW + ow) * C;
        unsigned char here = (unsigned char)((h % 2) * 2 + w % 2);
        for (long c = 0; c < C; c++) {
          float dz = pooled && winner[o + c] == here ? gout[o + c] : 0.f;
          float xhat = (y[i + c] - mean[c]) * invstd[c];
          dy[i + c] = a[c] * (dz - mdz[c] - xhat * mdzx[c]);
        }
      }
    }
  }
}
