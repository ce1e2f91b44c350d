/* cblas_sgemm for MLX's Linux CPU backend: wide products computed as column blocks.
 *
 * MLX's CPU matmul calls cblas_sgemm once per product, from each of its stream threads with MKL
 * at one thread. MKL's single-thread sgemm slows down when the output is wide (the FFN's up and
 * gate projections, their backward, the vocabulary head). Done as calls of `block` output
 * columns each, whole training steps ran 1.04-1.25x faster on an AMD EPYC (README, "How it runs
 * on a CPU"). Each block is an ordinary sgemm over the same rows of A and the whole K, so every
 * output element is the same dot product.
 *
 * edgeft/_blas.py loads this library into the global symbol scope before the BLAS, so MLX's
 * cblas_sgemm resolves here, and hands it the BLAS's own cblas_sgemm through edgeft_sgemm_next().
 * Built by the package's install (pyproject.toml) where a C compiler exists; without it MLX
 * calls the BLAS directly. The Python module it also is holds nothing: it lets the install find
 * and place the library like any other extension.
 */
#include <Python.h>

enum { ROW_MAJOR = 101, NO_TRANS = 111 };

typedef void (*sgemm_fn)(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                         const float *a, int lda, const float *b, int ldb, float beta, float *c,
                         int ldc);

static sgemm_fn next_sgemm;     /* the BLAS's cblas_sgemm */
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

void cblas_sgemm(int layout, int trans_a, int trans_b, int m, int n, int k, float alpha,
                 const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc) {
    sgemm_fn next = __atomic_load_n(&next_sgemm, __ATOMIC_RELAXED);
    int cols = __atomic_load_n(&block, __ATOMIC_RELAXED);
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
                                    .m_doc = "cblas_sgemm in column blocks (see edgeft/_blas.py)",
                                    .m_size = -1};

PyMODINIT_FUNC PyInit__sgemm(void) { return PyModule_Create(&module); }
