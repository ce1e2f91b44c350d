/* cblas_sgemm for MLX's Linux CPU backend: wide products computed as column blocks, and products
 * in bfloat16 where the CPU multiplies those faster.
 *
 * MLX's CPU matmul calls cblas_sgemm once per product, from each of its stream threads with MKL
 * at one thread. MKL's single-thread sgemm slows down when the output is wide (the FFN's up and
 * gate projections, their backward, the vocabulary head). Done as calls of `block` output
 * columns each, whole training steps ran 1.04-1.25x faster on an AMD EPYC (README, "How it runs
 * on a CPU"). Each block is an ordinary sgemm over the same rows of A and the whole K, so every
 * output element is the same dot product.
 *
 * bf16 (when edgeft/_blas.py hands it MKL's cblas_gemm_bf16bf16f32: only while a training run's
 * train.matmul takes bf16): A and B are rounded to bfloat16 (to nearest, ties to even, NaN kept)
 * into per-thread buffers, or, for a fixed matrix (a run's kept weights), once into its own copy,
 * and MKL multiplies them with fp32 sums into the fp32 C. A fixed matrix can also give its fp32
 * pages back to the system while its copy stands for it (see edgeft_sgemm_fix). On a CPU with AMX (Intel Xeon) that ran
 * 4x sgemm's speed at one thread. Products with a side under `bf16_from` (the rank-8 LoRA
 * products) stay fp32: rounding costs more there than it saves.
 *
 * edgeft/_blas.py loads this library into the global symbol scope before the BLAS, so MLX's
 * cblas_sgemm resolves here, and hands it the BLAS's own cblas_sgemm through edgeft_sgemm_next().
 * Built by the package's install (pyproject.toml) where a C compiler exists; without it MLX
 * calls the BLAS directly. The Python module it also is holds nothing: it lets the install find
 * and place the library like any other extension.
 */
#include <Python.h>
#include <limits.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111 };

typedef void (*sgemm_fn)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);

typedef void (*bf16_fn)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                        const uint16_t *a, int lda, const uint16_t *b, int ldb, float beta, float *c,
                        int ldc);

static sgemm_fn next_sgemm;     /* the BLAS's cblas_sgemm */
static bf16_fn bf16_gemm;       /* MKL's cblas_gemm_bf16bf16f32 while bf16 is on, else NULL */
static int bf16_from;           /* bf16 for products whose m, n and k are all at least this */
static int block;               /* output columns per call; 0: never split */
static int min_columns;         /* split outputs at least this wide ... */
static int min_rows;            /* ... with at least this many rows */

/* Set before MLX's first product (edgeft/_blas.py), and again to change the split; a product
 * already under way keeps the settings it started with. */
void edgeft_sgemm_next(sgemm_fn next, int columns_per_call, int from_columns, int from_rows) {
    __atomic_store_n(&next_sgemm, next, __ATOMIC_RELAXED);
    __atomic_store_n(&min_columns, from_columns, __ATOMIC_RELAXED);
    __atomic_store_n(&min_rows, from_rows, __ATOMIC_RELAXED);
    __atomic_store_n(&block, columns_per_call, __ATOMIC_RELAXED);
}

/* bf16 on (MKL's cblas_gemm_bf16bf16f32, products with every side >= from_size) or off (NULL). */
void edgeft_sgemm_bf16(bf16_fn gemm, int from_size) {
    __atomic_store_n(&bf16_from, from_size, __ATOMIC_RELAXED);
    __atomic_store_n(&bf16_gemm, gemm, __ATOMIC_RELAXED);
}

/* The bf16 GEMM while bf16 is on, else NULL, and the smallest side it takes (*from_size):
 * edgeft/_kernels.cpp's flash attention calls it with operands it rounds once each. */
bf16_fn edgeft_sgemm_bf16_current(int *from_size) {
    *from_size = __atomic_load_n(&bf16_from, __ATOMIC_RELAXED);
    return __atomic_load_n(&bf16_gemm, __ATOMIC_RELAXED);
}

/* rows x cols floats, row stride ld, into packed bfloat16 (round to nearest even; NaN stays NaN).
 * Branch-free, so that it vectorizes; compiled for AVX-512 and AVX2 as well where GCC can pick
 * at run time: 2.6 and 2.0 G values/s against 0.5 for the plain loop (Intel Xeon). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void edgeft_to_bf16(const float *x, int rows, int cols, int ld, uint16_t *out) {
    for (int r = 0; r < rows; r++) {
        const uint32_t *restrict u = (const uint32_t *)(x + (size_t)r * ld);
        uint16_t *restrict o = out + (size_t)r * cols;
        for (int j = 0; j < cols; j++) {
            uint32_t v = u[j];
            uint32_t nan = 0u - (uint32_t)((v & 0x7fffffffu) > 0x7f800000u);
            uint32_t rounded = (v + 0x7fffu + ((v >> 16) & 1u)) >> 16;
            o[j] = (uint16_t)((rounded & ~nan) | (((v >> 16) | 0x40u) & nan));
        }
    }
}

/* A buffer for `n` bfloat16 values: this thread's own, kept for its next products, up to
 * KEEP_VALUES (16 MB); larger ones (a vocabulary head's weight before it is fixed) are the
 * caller's to free (*owned set). */
enum { KEEP_VALUES = 8 << 20 };

static uint16_t *scratch(int which, size_t n, int *owned) {
    static __thread uint16_t *buf[2];
    static __thread size_t cap[2];
    *owned = n > KEEP_VALUES;
    if (*owned)
        return malloc(n * sizeof(uint16_t));
    if (n > cap[which]) {
        free(buf[which]);
        buf[which] = malloc(n * sizeof(uint16_t));
        cap[which] = buf[which] ? n : 0;
    }
    return buf[which];
}

/* Fixed matrices (a run's dequantized base weights, which stay in memory while they are here):
 * their bfloat16 copies, each made once, instead of in every product. A released one has also
 * given the whole pages of its fp32 values back to the system ([lo, hi), no access: a read
 * faults rather than finds zeros), so its products must go in bf16 from the copy whatever their
 * sides (edgeft_sgemm_restore and edgeft_sgemm_unfix give the pages back). */
enum { MAX_FIXED = 16384 };
static struct {
    const float *p;
    size_t n;
    uint16_t *copy;
    char *lo, *hi; /* released pages, or lo == hi */
} fixed[MAX_FIXED];
static int n_fixed;
static int n_released;
static pthread_mutex_t fixed_lock = PTHREAD_MUTEX_INITIALIZER;

/* The whole pages of [p, p + n floats), given back to the system once the copy exists. */
static void release(int i) {
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)fixed[i].p + page - 1) & ~(page - 1);
    uintptr_t hi = ((uintptr_t)(fixed[i].p + fixed[i].n)) & ~(page - 1);
    if (hi <= lo || mprotect((void *)lo, hi - lo, PROT_NONE) != 0)
        return;
    madvise((void *)lo, hi - lo, MADV_DONTNEED);
    fixed[i].lo = (char *)lo;
    fixed[i].hi = (char *)hi;
    n_released++;
}

/* Called while no product runs. With `give_back`, the copy is made now and the matrix's fp32
 * pages are released: only this library's products may read it until unfix. Returns 0 when
 * the table is full (the matrix is then rounded in each product, as any other). */
int edgeft_sgemm_fix(const float *p, size_t n, int give_back) {
    int i = n_fixed;
    if (i == MAX_FIXED || n > INT_MAX)
        return 0;
    fixed[i].p = p;
    fixed[i].n = n;
    fixed[i].copy = NULL;
    fixed[i].lo = fixed[i].hi = NULL;
    if (give_back && (fixed[i].copy = malloc(n * sizeof(uint16_t)))) {
        edgeft_to_bf16(p, 1, (int)n, (int)n, fixed[i].copy);
        release(i);
    }
    __atomic_store_n(&n_fixed, i + 1, __ATOMIC_RELEASE);
    return 1;
}

/* Called while no product runs: the released matrix that starts at p gets its memory back,
 * holding its copy's values (for one that outlives the block). */
void edgeft_sgemm_restore(const float *p) {
    for (int i = 0; i < n_fixed; i++) {
        if (fixed[i].p != p || fixed[i].lo == fixed[i].hi)
            continue;
        mprotect(fixed[i].lo, fixed[i].hi - fixed[i].lo, PROT_READ | PROT_WRITE);
        uint32_t *out = (uint32_t *)fixed[i].lo;
        const uint16_t *from = fixed[i].copy + (out - (const uint32_t *)fixed[i].p);
        for (size_t j = 0, count = (fixed[i].hi - fixed[i].lo) / sizeof(float); j < count; j++)
            out[j] = (uint32_t)from[j] << 16;
        fixed[i].lo = fixed[i].hi = NULL;
        n_released--;
    }
}

/* Called while no product runs: forget every fixed matrix and free the copies. The pages of
 * the matrices still released become readable again, as zeros, without being touched (so
 * they take no memory until written): those matrices must end with the block. */
void edgeft_sgemm_unfix(void) {
    for (int i = 0; i < n_fixed; i++) {
        if (fixed[i].lo != fixed[i].hi)
            mprotect(fixed[i].lo, fixed[i].hi - fixed[i].lo, PROT_READ | PROT_WRITE);
        free(fixed[i].copy);
    }
    n_released = 0;
    __atomic_store_n(&n_fixed, 0, __ATOMIC_RELEASE);
}

/* The fixed matrix that x points into, or -1. */
static int fixed_at(const float *x) {
    int count = __atomic_load_n(&n_fixed, __ATOMIC_ACQUIRE);
    for (int i = 0; i < count; i++)
        if (x >= fixed[i].p && x < fixed[i].p + fixed[i].n)
            return i;
    return -1;
}

/* Whether x points into a released matrix. */
static int released(const float *x) {
    if (!__atomic_load_n(&n_released, __ATOMIC_RELAXED))
        return 0;
    int i = fixed_at(x);
    return i >= 0 && fixed[i].lo != fixed[i].hi;
}

/* The bfloat16 copy of x (rows of `cols` values, `ld` apart, the copy in the same layout) where x
 * lies within a fixed matrix, made at its first product unless it exists; else NULL. */
static const uint16_t *fixed_copy(const float *x, int rows, int cols, int ld) {
    size_t span = (size_t)(rows - 1) * ld + cols;
    int i = fixed_at(x);
    if (i < 0)
        return NULL;
    size_t at = (size_t)(x - fixed[i].p);
    if (at + span > fixed[i].n) {
        if (fixed[i].lo == fixed[i].hi)
            return NULL;
        fprintf(stderr, "edgeft: a product reads past a released weight of %zu values; this is a bug "
                        "in edgeft (train with --matmul fp32 meanwhile)\n", fixed[i].n);
        abort();
    }
    uint16_t *copy = __atomic_load_n(&fixed[i].copy, __ATOMIC_ACQUIRE);
    if (!copy) {
        pthread_mutex_lock(&fixed_lock);
        copy = fixed[i].copy;
        if (!copy && (copy = malloc(fixed[i].n * sizeof(uint16_t)))) {
            edgeft_to_bf16(fixed[i].p, 1, (int)fixed[i].n, (int)fixed[i].n, copy);
            __atomic_store_n(&fixed[i].copy, copy, __ATOMIC_RELEASE);
        }
        pthread_mutex_unlock(&fixed_lock);
    }
    return copy ? copy + at : NULL;
}

/* One operand in bfloat16 with its leading dimension (*ld_out): its fixed copy (ld as given), or
 * rounded into a packed buffer (`cols`; *owned: the caller frees it). NULL where there was no
 * memory for it. */
static const uint16_t *operand(int which, const float *x, int rows, int cols, int ld, int *owned, int *ld_out) {
    const uint16_t *copy = fixed_copy(x, rows, cols, ld);
    *owned = 0;
    *ld_out = ld;
    if (copy)
        return copy;
    uint16_t *buf = scratch(which, (size_t)rows * cols, owned);
    if (buf)
        edgeft_to_bf16(x, rows, cols, ld, buf);
    *ld_out = cols;
    return buf;
}

/* The product in bf16, whole: in column blocks it ran no faster. Returns 0 where it could not
 * (no memory), and the caller does it in fp32. */
static int bf16_product(bf16_fn gemm, int trans_a, int trans_b, int m, int n, int k, float alpha,
                        const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    int a_rows = trans_a == NO_TRANS ? m : k, a_cols = trans_a == NO_TRANS ? k : m;
    int b_rows = trans_b == NO_TRANS ? k : n, b_cols = trans_b == NO_TRANS ? n : k;
    int own_a, own_b, lda_h, ldb_h;
    const uint16_t *ah = operand(0, a, a_rows, a_cols, lda, &own_a, &lda_h);
    const uint16_t *bh = operand(1, b, b_rows, b_cols, ldb, &own_b, &ldb_h);
    int done = ah && bh;
    if (done)
        gemm(ROW_MAJOR, trans_a, trans_b, m, n, k, alpha, ah, lda_h, bh, ldb_h, beta, c, ldc);
    if (own_a)
        free((void *)ah);
    if (own_b)
        free((void *)bh);
    return done;
}

void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    sgemm_fn next = __atomic_load_n(&next_sgemm, __ATOMIC_RELAXED);
    int cols = __atomic_load_n(&block, __ATOMIC_RELAXED);
    bf16_fn gemm = __atomic_load_n(&bf16_gemm, __ATOMIC_RELAXED);
    int from = __atomic_load_n(&bf16_from, __ATOMIC_RELAXED);
    int must = released(a) | released(b); /* its fp32 values are gone: from the copy, at any size */
    if (gemm && layout == ROW_MAJOR && (must || (m >= from && n >= from && k >= from)) &&
        bf16_product(gemm, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc))
        return;
    if (must) {
        fprintf(stderr, "edgeft: a product of a released weight could not go in bfloat16 (%s); "
                        "train with --matmul fp32\n", gemm && layout == ROW_MAJOR ? "out of memory" : "bf16 is off");
        abort();
    }
    if (cols <= 0 || layout != ROW_MAJOR || n <= cols || n < __atomic_load_n(&min_columns, __ATOMIC_RELAXED) ||
        m < __atomic_load_n(&min_rows, __ATOMIC_RELAXED)) {
        next(layout, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return;
    }
    for (int j = 0; j < n; j += cols) {
        int width = n - j < cols ? n - j : cols;
        /* columns j.. of B: a column offset when B is K x N, a row offset when it is N x K */
        const float *bj = trans_b == NO_TRANS ? b + j : b + (size_t)j * ldb;
        next(layout, trans_a, trans_b, m, width, k, alpha, a, lda, bj, ldb, beta, c + j, ldc);
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_sgemm",
                                    .m_doc = "cblas_sgemm in column blocks and in bfloat16 (see edgeft/_blas.py)",
                                    .m_size = -1};

PyMODINIT_FUNC PyInit__sgemm(void) { return PyModule_Create(&module); }
