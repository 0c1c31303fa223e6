#ifndef CLAPACK_SHIM_H
#define CLAPACK_SHIM_H
#include <stddef.h>

// The few LAPACK and BLAS routines the svd strategy uses, from OpenBLAS (Debian's libopenblas-dev),
// declared with the Fortran calling convention: every argument by reference, matrices column-major,
// and for each character argument a hidden length after the others (as gfortran passes it).

// Householder QR: A = Q·R, with R in the upper triangle and Q as reflectors below it.
void dgeqrf_(const int *m, const int *n, double *a, const int *lda, double *tau, double *work, const int *lwork, int *info);
// C = op(Q)·C (or C·op(Q)) with Q given by dgeqrf's reflectors, without forming Q. It writes into
// `a` while it runs (restoring it), so `a` is not const.
void dormqr_(const char *side, const char *trans, const int *m, const int *n, const int *k, double *a, const int *lda, const double *tau,
             double *c, const int *ldc, double *work, const int *lwork, int *info, size_t side_length, size_t trans_length);
// SVD by divide and conquer: A = U·diag(s)·Vᵀ, singular values descending.
void dgesdd_(const char *jobz, const int *m, const int *n, double *a, const int *lda, double *s, double *u, const int *ldu, double *vt,
             const int *ldvt, double *work, const int *lwork, int *iwork, int *info, size_t jobz_length);
// C = alpha·op(A)·op(B) + beta·C.
void dgemm_(const char *transa, const char *transb, const int *m, const int *n, const int *k, const double *alpha, const double *a,
            const int *lda, const double *b, const int *ldb, const double *beta, double *c, const int *ldc, size_t transa_length,
            size_t transb_length);
// OpenBLAS runs each call on this many threads; one keeps every sum in one order, so results do not
// depend on the machine's core count (parallelism comes from factoring modules side by side).
void openblas_set_num_threads(int count);
// The build (version and options) and the kernels chosen for this CPU: with the inputs, what decides
// the bits of every result.
char *openblas_get_config(void);
char *openblas_get_corename(void);

#endif
