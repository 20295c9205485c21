/* AVX-512 products of a CSR matrix W (rows x cols, int32 indices, float32 values) with a thin
 * dense side of k <= 64 columns: a Linear layer's batch (kernels.py, simd.py say when they run).
 *
 * Every dense operand is row-major with a row stride ld that is a multiple of 16 floats, its
 * columns k..ld-1 zero: a row is whole 512-bit vectors and, in torch's 64-byte aligned buffers, no
 * load splits a cache line (MKL's CSR kernels on rows of k = 20 floats do; that, and the permuted
 * copy of Wᵀ that MKL's fast path needs, are what these save). Each output sums its products in
 * a fixed order, on one thread: the same bits for the same input whatever the process.
 *
 *   csr_mm    C = W · B        B: cols x ld, C: rows x ld
 *   csr_t_mm  C = Wᵀ · A       A: rows x ld, C: cols x ld (zeroed here)
 *   sddmm     out[n] = A[r] · B[c] for each active position n = (r, c), in CSR order
 *
 * Built by setup.py as an optional extension and loaded with ctypes (fedmpi/native.py): where it
 * cannot be built, or the CPU lacks AVX-512F, simd.py reports it unavailable and the MKL paths run.
 */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f")))

int fedmpi_simd_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* NC vectors of 16 floats per row (NC = ld / 16), unrolled so the accumulators live in registers */
#define CSR_MM(NC)                                                                                    \
    static AVX512 void csr_mm_##NC(int64_t rows, const int32_t *crow, const int32_t *col,          \
                                   const float *val, const float *b, float *c) {                     \
        for (int64_t r = 0; r < rows; r++) {                                                         \
            __m512 s[NC], t[NC];                                                                     \
            for (int j = 0; j < NC; j++) s[j] = t[j] = _mm512_setzero_ps();                          \
            int32_t n = crow[r], end = crow[r + 1];                                                  \
            for (; n + 1 < end; n += 2) { /* two chains: FMA latency, not throughput, bounds one */ \
                const float *b0 = b + (int64_t)col[n] * (16 * NC);                                   \
                const float *b1 = b + (int64_t)col[n + 1] * (16 * NC);                               \
                __m512 v0 = _mm512_set1_ps(val[n]), v1 = _mm512_set1_ps(val[n + 1]);                 \
                for (int j = 0; j < NC; j++) {                                                       \
                    s[j] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(b0 + 16 * j), s[j]);                   \
                    t[j] = _mm512_fmadd_ps(v1, _mm512_loadu_ps(b1 + 16 * j), t[j]);                   \
                }                                                                                    \
            }                                                                                        \
            if (n < end) {                                                                           \
                const float *b0 = b + (int64_t)col[n] * (16 * NC);                                   \
                __m512 v0 = _mm512_set1_ps(val[n]);                                                  \
                for (int j = 0; j < NC; j++)                                                         \
                    s[j] = _mm512_fmadd_ps(v0, _mm512_loadu_ps(b0 + 16 * j), s[j]);                   \
            }                                                                                        \
            for (int j = 0; j < NC; j++)                                                             \
                _mm512_storeu_ps(c + r * (16 * NC) + 16 * j, _mm512_add_ps(s[j], t[j]));              \
        }                                                                                            \
    }

#define CSR_T_MM(NC)                                                                                  \
    static AVX512 void csr_t_mm_##NC(int64_t rows, int64_t cols, const int32_t *crow,              \
                                     const int32_t *col, const float *val, const float *a,           \
                                     float *c) {                                                     \
        memset(c, 0, sizeof(float) * (size_t)cols * (16 * NC));                                     \
        for (int64_t r = 0; r < rows; r++) {                                                         \
            __m512 ar[NC];                                                                           \
            for (int j = 0; j < NC; j++) ar[j] = _mm512_loadu_ps(a + r * (16 * NC) + 16 * j);         \
            for (int32_t n = crow[r]; n < crow[r + 1]; n++) {                                        \
                __m512 v = _mm512_set1_ps(val[n]);                                                   \
                float *cr = c + (int64_t)col[n] * (16 * NC);                                         \
                for (int j = 0; j < NC; j++)                                                         \
                    _mm512_storeu_ps(cr + 16 * j, _mm512_fmadd_ps(v, ar[j], _mm512_loadu_ps(cr + 16 * j))); \
            }                                                                                        \
        }                                                                                            \
    }

#define SDDMM(NC)                                                                                     \
    static AVX512 void sddmm_##NC(int64_t rows, const int32_t *crow, const int32_t *col,           \
                                  const float *a, const float *b, float *out) {                      \
        for (int64_t r = 0; r < rows; r++) {                                                         \
            __m512 ar[NC];                                                                           \
            for (int j = 0; j < NC; j++) ar[j] = _mm512_loadu_ps(a + r * (16 * NC) + 16 * j);         \
            for (int32_t n = crow[r]; n < crow[r + 1]; n++) {                                        \
                const float *br = b + (int64_t)col[n] * (16 * NC);                                   \
                __m512 p = _mm512_mul_ps(ar[0], _mm512_loadu_ps(br));                                 \
                for (int j = 1; j < NC; j++) p = _mm512_fmadd_ps(ar[j], _mm512_loadu_ps(br + 16 * j), p); \
                out[n] = _mm512_reduce_add_ps(p);                                                    \
            }                                                                                        \
        }                                                                                            \
    }

#define ALL(NC) CSR_MM(NC) CSR_T_MM(NC) SDDMM(NC)
ALL(1) ALL(2) ALL(3) ALL(4)

/* The entry points: ld in {16, 32, 48, 64}; return 0 on success, -1 for another ld. */
#define BY_WIDTH(name, ...)                                                                           \
    switch (ld) {                                                                                    \
    case 16: name##_1(__VA_ARGS__); return 0;                                                        \
    case 32: name##_2(__VA_ARGS__); return 0;                                                        \
    case 48: name##_3(__VA_ARGS__); return 0;                                                        \
    case 64: name##_4(__VA_ARGS__); return 0;                                                        \
    }                                                                                                \
    return -1;

int fedmpi_csr_mm(int64_t rows, int64_t ld, const int32_t *crow, const int32_t *col, const float *val,
                  const float *b, float *c) {
    BY_WIDTH(csr_mm, rows, crow, col, val, b, c)
}

int fedmpi_csr_t_mm(int64_t rows, int64_t cols, int64_t ld, const int32_t *crow, const int32_t *col,
                    const float *val, const float *a, float *c) {
    BY_WIDTH(csr_t_mm, rows, cols, crow, col, val, a, c)
}

int fedmpi_sddmm(int64_t rows, int64_t ld, const int32_t *crow, const int32_t *col, const float *a,
                 const float *b, float *out) {
    BY_WIDTH(sddmm, rows, crow, col, a, b, out)
}

#else   /* not x86-64 with GCC or Clang: nothing here runs; simd.py falls back to MKL */
int fedmpi_simd_available(void) { return 0; }
int fedmpi_csr_mm(int64_t rows, int64_t ld, const int32_t *crow, const int32_t *col, const float *val,
                  const float *b, float *c) { return -1; }
int fedmpi_csr_t_mm(int64_t rows, int64_t cols, int64_t ld, const int32_t *crow, const int32_t *col,
                    const float *val, const float *a, float *c) { return -1; }
int fedmpi_sddmm(int64_t rows, int64_t ld, const int32_t *crow, const int32_t *col, const float *a,
                 const float *b, float *out) { return -1; }
#endif
