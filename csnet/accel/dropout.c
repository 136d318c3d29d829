/* Dropout for the CPU (csnet/models/columns.py (accelerated by csnet/accel), Dropout; native.py compiles and loads it).
 *
 * Why: torch's CPU dropout draws its mask with bernoulli_, about 1.1 ms for the (128, 1024)
 * activations before each head of the Fashion pair, forward alone: 3% of a training step. Here
 * the mask is a hash of the element's index and a 64-bit seed drawn from torch's generator (so
 * torch.manual_seed still fixes it), computed where it is used: the forward pass writes
 * x * mask / (1 - p) and the backward pass recomputes the same mask for the gradient, so no mask
 * is stored. Each element is kept with probability 1 - p (to 2^-24), as in nn.Dropout, and the
 * same seed gives the same mask at any number of threads; the masks are not those nn.Dropout
 * would draw.
 *
 * The hash is SplitMix64's output function (Steele, Lea and Flood, OOPSLA 2014) on
 * seed + (index + 1) * 2^64 / golden ratio.
 */
#include <stdint.h>
#include <omp.h>

/* 24 uniform bits for element i. */
static inline uint32_t draw(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return (uint32_t)((z ^ (z >> 31)) >> 40);
}

/* out[i] = x[i] * scale where draw(seed, i) >= threshold, else x[i] * 0 (so NaN stays NaN, as in
 * nn.Dropout, which multiplies by its mask). threshold = p * 2^24 rounded, scale = 1 / (1 - p). */
void csnet_dropout(const float *restrict x, float *restrict out, long n, uint64_t seed, uint32_t threshold,
                   float scale, int threads) {
  #pragma omp parallel for num_threads(threads) schedule(static)
  for (long i = 0; i < n; i++) out[i] = x[i] * (draw(seed, (uint64_t)i) >= threshold ? scale : 0.f);
}
