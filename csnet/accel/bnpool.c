/* Batch norm -> 2x2 max-pool -> ReLU fused, for the convnet column's conv blocks
 * (csnet/models/columns.py (accelerated by csnet/accel), the Fashion-MNIST column of the TensorFlow reproduction of cross-stitch networks), on
 * channels-last float32 maps on the CPU. csnet/accel/build.py compiles and loads it.
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

/* ------------------------------------------------------------------------------------------------
 * The first conv block whole: 3x3 conv (stride 1, zero padding 1, no bias) -> batch norm -> 2x2
 * max-pool -> ReLU, for an input that needs no gradient (the images) and few input channels.
 *
 * Why: the first conv's output is the largest map of the column (32 channels at 28x28 for the
 * Fashion column, 12.8 MB per batch of 128), and its conv is tiny (9 products per value). Run as
 * a conv, then the fused layers above, that map is written, read twice going forward and once
 * going back, and its gradient written and read again by the conv's weight gradient. Here the map
 * never exists:
 *  - batch-norm statistics come from the input's patch moments. With P the (taps,) patch of a
 *    position and w a channel's weights, y = w.P, so sum y = w.S and sum y^2 = w'Gw, where
 *    S = sum P and G = sum PP' over all positions (csnet_patch_moments);
 *  - the forward pass computes each window's four conv values in registers, normalises, pools
 *    and writes only the pooled output and each output's winner (csnet_conv_bn_pool_relu_forward);
 *  - the backward pass sums, per channel, dz and dz times the winner's patch over the pooled
 *    outputs (csnet_conv_bn_pool_relu_backward). Batch norm's backward and the conv's weight
 *    gradient follow in closed form from those sums and S, G (columns.py), since the conv's
 *    input gradient is not needed.
 * Taps are in (dh, dw, ci) order; the input is (B, H, W, Cin) in memory (channels last).
 * Vectors are GCC vector extensions of 16 lanes (one AVX-512 register, two AVX2 ones).
 */
#define V 16
typedef float vf __attribute__((vector_size(V * sizeof(float)), aligned(sizeof(float))));
typedef int vi __attribute__((vector_size(V * sizeof(int))));
typedef unsigned char vb __attribute__((vector_size(V), aligned(1)));

/* Row length of a padded image: one zero on the left, the width rounded up to whole vectors and one
 * more zero, so a vector load at any output column plus dw in 0..2 stays inside the row. */
static long padded_width(long W) { return (W + V - 1) / V * V + 2; }

/* Image b zero-padded, channel planes apart: pad[ci][H + 2][padded_width(W)]. */
static void pad_image(const float *restrict x, long b, long H, long W, long Cin, float *restrict pad) {
  long PW = padded_width(W);
  memset(pad, 0, Cin * (H + 2) * PW * sizeof(float));
  for (long h = 0; h < H; h++)
    for (long w = 0; w < W; w++)
      for (long ci = 0; ci < Cin; ci++)
        pad[(ci * (H + 2) + h + 1) * PW + w + 1] = x[((b * H + h) * W + w) * Cin + ci];
}

/* Where each tap of output (0, 0) sits in a padded image; output (h, w)'s are h * PW + w further. */
static void tap_offsets(long Cin, long H, long PW, long *restrict off) {
  for (long dh = 0, t = 0; dh < 3; dh++)
    for (long dw = 0; dw < 3; dw++)
      for (long ci = 0; ci < Cin; ci++) off[t++] = (ci * (H + 2) + dh) * PW + dw;
}

/* The four patches of pooled output (oh, ow)'s window: p[q * taps + t], q = 2 * row + column. */
static inline void window_patches(const float *restrict pad, long oh, long ow, long taps, const long *restrict off,
                                  long PW, float *restrict p) {
  for (int q = 0; q < 4; q++) {
    const float *at = pad + (2 * oh + q / 2) * PW + 2 * ow + q % 2;
    for (long t = 0; t < taps; t++) p[q * taps + t] = at[off[t]];
  }
}

#define FLUSH 64 /* sums added per lane in float before they go into double */

/* S (taps) and G (taps x taps) over all B x H x W positions. Each thread takes whole images and
 * sums them 16 positions at a time in float, then into double after at most FLUSH vectors per
 * lane (every 32 rows at 28 wide). Scratch from the caller:
 * pads (threads x Cin (H + 2) padded_width(W) floats), rows (threads x (taps^2 + taps) x 16
 * floats) and parts (threads x (taps^2 + taps) zeroed doubles). */
void csnet_patch_moments(const float *restrict x, long B, long H, long W, long Cin, double *restrict S,
                         double *restrict G, float *restrict pads, float *restrict rows, double *restrict parts,
                         int threads) {
  long taps = 9 * Cin, n = taps * taps + taps, PW = padded_width(W);
  int used = 1;
  #pragma omp parallel num_threads(threads)
  {
    int me = omp_get_thread_num();
    float *pad = pads + me * Cin * (H + 2) * PW;
    vf *acc = (vf *)(rows + me * n * V), r[taps];
    double *part = parts + me * n;
    long b0, b1, off[taps];
    tap_offsets(Cin, H, PW, off);
    #pragma omp single
    used = omp_get_num_threads();
    share(B, &b0, &b1);
    long chunks = (W + V - 1) / V, summed = 0;  /* float sums per lane since the last flush */
    memset(acc, 0, n * sizeof(vf));
    for (long b = b0; b < b1; b++) {
      pad_image(x, b, H, W, Cin, pad);
      for (long h = 0; h < H; h++) {
        if (summed + chunks > FLUSH) {
          for (long k = 0; k < n; k++)
            for (int i = 0; i < V; i++) part[k] += acc[k][i];
          memset(acc, 0, n * sizeof(vf));
          summed = 0;
        }
        summed += chunks;
        for (long w0 = 0; w0 < W; w0 += V) {
          vf live;  /* positions past the right edge count for nothing */
          for (int i = 0; i < V; i++) live[i] = w0 + i < W;
          for (long t = 0; t < taps; t++) r[t] = *(const vf *)(pad + h * PW + w0 + off[t]) * live;
          for (long t = 0; t < taps; t++) {
            acc[taps * taps + t] += r[t];
            for (long u = t; u < taps; u++) acc[t * taps + u] += r[t] * r[u];
          }
        }
      }
    }
    for (long k = 0; k < n; k++)
      for (int i = 0; i < V; i++) part[k] += acc[k][i];
  }
  memset(S, 0, taps * sizeof(double));
  memset(G, 0, taps * taps * sizeof(double));
  for (int t = 0; t < used; t++)  /* the threads' sums, in thread order */
    for (long i = 0; i < taps; i++) {
      S[i] += parts[t * n + taps * taps + i];
      for (long j = i; j < taps; j++) G[i * taps + j] += parts[t * n + i * taps + j];
    }
  for (long i = 0; i < taps; i++)
    for (long j = 0; j < i; j++) G[i * taps + j] = G[j * taps + i];
}

static inline vf select(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }

/* pool_pixel on 16 channels held in registers: the window's four values a[0..3] (pre-norm). */
static inline void pool_vector(const vf a[4], vf scale, vf shift, float *restrict out, unsigned char *restrict winner) {
  vf v1 = a[1] * scale + shift, v2 = a[2] * scale + shift, v3 = a[3] * scale + shift;
  vf best = a[0] * scale + shift;
  vi arg = {0}, m;
  m = (v1 > best) | (v1 != v1), best = select(m, v1, best), arg = (arg & ~m) | (m & 1);
  m = (v2 > best) | (v2 != v2), best = select(m, v2, best), arg = (arg & ~m) | (m & 2);
  m = (v3 > best) | (v3 != v3), best = select(m, v3, best), arg = (arg & ~m) | (m & 3);
  vi dropped = best <= 0.f;
  *(vf *)out = select(dropped, (vf){0}, best);
  if (winner) *(vb *)winner = __builtin_convertvector((arg & ~dropped) | (dropped & DROPPED), vb);
}

/* Pooled rows [r0, r1) of csnet_conv_bn_pool_relu_forward, for a Cin known when inlined (so the
 * taps loops unroll and the accumulators stay in registers). */
static inline __attribute__((always_inline)) void conv_pool_rows(
    const float *restrict x, const float *restrict wt, const float *restrict scale, const float *restrict shift,
    float *restrict out, unsigned char *restrict winner, long H, long W, const long Cin, long C,
    float *restrict pad, long r0, long r1) {
  const long taps = 9 * Cin;
  long OH = H / 2, OW = W / 2, PW = padded_width(W), padded = -1, off[taps];
  float p[4 * taps], y[4][V], raw[V];
  tap_offsets(Cin, H, PW, off);
  for (long r = r0; r < r1; r++) {
    long b = r / OH, oh = r % OH;
    if (b != padded) pad_image(x, b, H, W, Cin, pad), padded = b;
    for (long ow = 0; ow < OW; ow++) {
      window_patches(pad, oh, ow, taps, off, PW, p);
      long o = (r * OW + ow) * C, c0 = 0;
      for (; c0 + V <= C; c0 += V) {  /* the window's four conv values of 16 channels, in registers */
        vf a[4] = {0};
        for (long t = 0; t < taps; t++) {
          vf wv = *(const vf *)(wt + t * C + c0);
          for (int q = 0; q < 4; q++) a[q] += wv * p[q * taps + t];
        }
        pool_vector(a, *(const vf *)(scale + c0), *(const vf *)(shift + c0), out + o + c0,
                    winner ? winner + o + c0 : NULL);
      }
      if (c0 < C) {  /* the last channels, fewer than 16 */
        long m = C - c0;
        for (int q = 0; q < 4; q++)
          for (long c = 0; c < m; c++) {
            float v = 0.f;
            for (long t = 0; t < taps; t++) v += wt[t * C + c0 + c] * p[q * taps + t];
            y[q][c] = v;
          }
        if (winner)
          pool_pixel(y[0], y[1], y[2], y[3], scale + c0, shift + c0, out + o + c0, winner + o + c0, raw, m);
        else
          pool_pixel_eval(y[0], y[1], y[2], y[3], scale + c0, shift + c0, out + o + c0, m);
      }
    }
  }
}

/* out = ReLU(max-pool(conv(x) * scale + shift)); wt: (taps, C) conv weights. winner as in
 * csnet_bn_pool_relu_forward (NULL in evaluation). Scratch: pads as above. Cin is 1, 2 or 3. */
void csnet_conv_bn_pool_relu_forward(const float *restrict x, const float *restrict wt, const float *restrict scale,
                                     const float *restrict shift, float *restrict out, unsigned char *restrict winner,
                                     long B, long H, long W, long Cin, long C, float *restrict pads, int threads) {
  #pragma omp parallel num_threads(threads)
  {
    float *pad = pads + omp_get_thread_num() * Cin * (H + 2) * padded_width(W);
    long r0, r1;
    share(B * (H / 2), &r0, &r1);
    if (Cin == 1) conv_pool_rows(x, wt, scale, shift, out, winner, H, W, 1, C, pad, r0, r1);
    else if (Cin == 2) conv_pool_rows(x, wt, scale, shift, out, winner, H, W, 2, C, pad, r0, r1);
    else conv_pool_rows(x, wt, scale, shift, out, winner, H, W, 3, C, pad, r0, r1);
  }
}

/* Pooled rows [r0, r1) of csnet_conv_bn_pool_relu_backward into part (float over one pooled row,
 * then double), for a Cin known when inlined. */
static inline __attribute__((always_inline)) void conv_pool_sums(
    const float *restrict x, const float *restrict gout, const unsigned char *restrict winner, long H, long W,
    const long Cin, long C, float *restrict pad, double *restrict part, long r0, long r1) {
  const long taps = 9 * Cin;
  long OH = H / 2, OW = W / 2, PW = padded_width(W), padded = -1, off[taps];
  float p[OW * 4 * taps];
  tap_offsets(Cin, H, PW, off);
  for (long r = r0; r < r1; r++) {
    long b = r / OH, oh = r % OH, c0 = 0;
    if (b != padded) pad_image(x, b, H, W, Cin, pad), padded = b;
    for (long ow = 0; ow < OW; ow++) window_patches(pad, oh, ow, taps, off, PW, p + ow * 4 * taps);
    for (; c0 + V <= C; c0 += V) {  /* 16 channels' sums over the row, in registers */
      vf q[taps], a = {0};
      for (long t = 0; t < taps; t++) q[t] = (vf){0};
      for (long ow = 0; ow < OW; ow++) {
        long o = (r * OW + ow) * C + c0;
        vf g = *(const vf *)(gout + o);
        vi k = __builtin_convertvector(*(const vb *)(winner + o), vi);
        a += (vf)((vi)g & (k != DROPPED));
        for (int w = 0; w < 4; w++) {
          vf gw = (vf)((vi)g & (k == w));
          const float *pw = p + (ow * 4 + w) * taps;
          for (long t = 0; t < taps; t++) q[t] += gw * pw[t];
        }
      }
      for (long t = 0; t < taps; t++)
        for (int i = 0; i < V; i++) part[t * C + c0 + i] += q[t][i];
      for (int i = 0; i < V; i++) part[taps * C + c0 + i] += a[i];
    }
    for (long c = c0; c < C; c++) {  /* the last channels, fewer than 16 */
      float qs[taps], as = 0.f;
      for (long t = 0; t < taps; t++) qs[t] = 0.f;
      for (long ow = 0; ow < OW; ow++) {
        long o = (r * OW + ow) * C + c;
        if (winner[o] == DROPPED) continue;
        as += gout[o];
        for (long t = 0; t < taps; t++) qs[t] += gout[o] * p[(ow * 4 + winner[o]) * taps + t];
      }
      for (long t = 0; t < taps; t++) part[t * C + c] += qs[t];
      part[taps * C + c] += as;
    }
  }
}

/* Per tap t and channel c: Q[t][c] = sum of dz * (winner's patch)[t], and A[c] = sum of dz, over the
 * pooled outputs, dz being gout where the ReLU let the winner through. Scratch: pads as above,
 * parts (threads x (taps + 1) x C zeroed doubles). Cin is 1, 2 or 3. */
void csnet_conv_bn_pool_relu_backward(const float *restrict x, const float *restrict gout,
                                      const unsigned char *restrict winner, long B, long H, long W, long Cin, long C,
                                      double *restrict Q, double *restrict A, double *restrict parts,
                                      float *restrict pads, int threads) {
  long taps = 9 * Cin, n = (taps + 1) * C;
  int used = 1;
  #pragma omp parallel num_threads(threads)
  {
    int me = omp_get_thread_num();
    float *pad = pads + me * Cin * (H + 2) * padded_width(W);
    double *part = parts + me * n;
    long r0, r1;
    #pragma omp single
    used = omp_get_num_threads();
    share(B * (H / 2), &r0, &r1);
    if (Cin == 1) conv_pool_sums(x, gout, winner, H, W, 1, C, pad, part, r0, r1);
    else if (Cin == 2) conv_pool_sums(x, gout, winner, H, W, 2, C, pad, part, r0, r1);
    else conv_pool_sums(x, gout, winner, H, W, 3, C, pad, part, r0, r1);
  }
  memset(Q, 0, taps * C * sizeof(double));
  memset(A, 0, C * sizeof(double));
  for (int t = 0; t < used; t++) {  /* the threads' sums, in thread order */
    for (long i = 0; i < taps * C; i++) Q[i] += parts[t * n + i];
    for (long c = 0; c < C; c++) A[c] += parts[t * n + taps * C + c];
  }
}
