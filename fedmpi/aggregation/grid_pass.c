/* The fixed-point sum's pass over a group's uploads of one tensor (quantise.py, fixed_point.py),
 * fused: per element i, over the uploads k (float32 values θ_k, integer weights w_k as doubles),
 *
 *   largest[i]  = max(largest[i], w_k·|θ_k[i]|)          every upload   (float64, exact)
 *   total[i]   += w_k·θ_k[i]                              w_k > 0 only   (float64)
 *   smallest[i] = min(smallest[i], |θ_k[i]|)              w_k > 0 only   (float32, exact)
 *
 * in chunks of CHUNK elements, every upload per chunk, so the running arrays stay in cache while
 * the uploads stream through once. The maxima and minima are exact and order-free; the totals are
 * exact wherever quantise.py's on-grid test later passes (it redoes the other elements), so the
 * numbers are the ones numpy/torch give on the same data. Returns 1 when some w_k·|θ_k[i]| is
 * not finite (the caller names the upload), else 0.
 *
 * Built by setup.py as an optional extension and loaded with ctypes (fedmpi/native.py); without
 * it quantise.py runs the same pass with numpy and torch. One build runs on every x86-64 CPU:
 * target_clones makes AVX-512, AVX2 and baseline copies and picks one when the library loads.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

#define CHUNK 1024    /* 20 bytes of running values per element: 20 KiB, inside a core's L1 */

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

CLONES
int fedmpi_grid_pass(int64_t n, int64_t uploads, const float *const *theta, const double *w,
                     double *restrict largest, double *restrict total, float *restrict smallest) {
    int not_finite = 0;
    for (int64_t start = 0; start < n; start += CHUNK) {
        int64_t stop = start + CHUNK < n ? start + CHUNK : n;
        for (int64_t k = 0; k < uploads; k++) {
            const float *restrict t = theta[k];
            const double wk = w[k];
            int bad = 0;
            if (wk > 0) {
                for (int64_t i = start; i < stop; i++) {
                    double x = wk * (double)t[i];    /* exact */
                    double ax = fabs(x);             /* w·|θ|: w > 0 */
                    float a = fabsf(t[i]);
                    largest[i] = ax > largest[i] ? ax : largest[i];
                    bad |= !(ax <= DBL_MAX);         /* NaN or inf */
                    total[i] += x;
                    smallest[i] = a < smallest[i] ? a : smallest[i];
                }
            } else {                                   /* w = 0: only 0·|θ| (NaN for inf or NaN θ) */
                for (int64_t i = start; i < stop; i++) {
                    double x = wk * (double)fabsf(t[i]);
                    largest[i] = x > largest[i] ? x : largest[i];
                    bad |= !(x <= DBL_MAX);
                }
            }
            not_finite |= bad;
        }
    }
    return not_finite;
}

/* The elements the on-grid test sends back (quantise.py ``_on_grid_sum``): per listed element
 * i = index[j], Σ_k trunc(θ_k[i]·(w_k·factor[j])) in int64, the truncating sum's integers
 * (w_k·factor is an integer times a power of two, exact; so is its product with a float32 θ; the
 * cast truncates toward zero, as numpy's and torch's). */
void fedmpi_off_grid_sum(int64_t m, const int64_t *index, int64_t uploads, const float *const *theta,
                         const double *w, const double *factor, int64_t *out) {
    for (int64_t j = 0; j < m; j++) {
        int64_t i = index[j], sum = 0;
        for (int64_t k = 0; k < uploads; k++)
            sum += (int64_t)((double)theta[k][i] * (w[k] * factor[j]));
        out[j] = sum;
    }
}
