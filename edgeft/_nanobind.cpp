// nanobind's own sources, compiled into edgeft._kernels (as nanobind's NB_STATIC CMake build does).
#define NB_BUILD 1
#include "nb_combined.cpp"
