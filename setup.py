"""edgeft's two optional compiled extensions; everything else is in pyproject.toml.

edgeft._sgemm (C): MLX's cblas_sgemm on Linux, see edgeft/_blas.py.
edgeft._kernels (C++): the exp-heavy ops of a training step (the attention softmax, the gated
MLP activations, the loss's cross-entropy) and a flash attention as MLX CPU primitives, see
edgeft/_kernels.cpp. It is
built against the MLX and nanobind of the build environment (pyproject.toml's build
requirements: the same MLX range as the run's, and the nanobind whose ABI that MLX's Python
module was built with), and used only when the running MLX is the version it was built for.

Both are optional: an install without a C or C++ compiler goes on, and edgeft then runs MLX's
own ops and BLAS call.
"""

from pathlib import Path

from setuptools import Extension, setup


def kernels_extension() -> list[Extension]:
    try:
        import mlx
        import nanobind
    except ImportError:  # built without pyproject.toml's build requirements
        return []
    mlx_dir = next((Path(p) for p in mlx.__path__ if (Path(p) / "include" / "mlx" / "mlx.h").exists()), None)
    if mlx_dir is None:
        return []
    nb = Path(nanobind.__file__).parent
    return [Extension(
        "edgeft._kernels",
        sources=["edgeft/_kernels.cpp", "edgeft/_nanobind.cpp"],
        include_dirs=[nanobind.include_dir(), str(nb / "src"), str(nb / "ext" / "robin_map" / "include"),
                      str(mlx_dir / "include")],
        define_macros=[("NB_DOMAIN", "mlx")],  # share mlx.core's nanobind types (its mx.array)
        extra_compile_args=["-std=c++20", "-O3", "-fvisibility=hidden", "-fno-strict-aliasing"],
        library_dirs=[str(mlx_dir / "lib")],
        libraries=["mlx"],  # found at run time as the libmlx.so that mlx.core has loaded
        language="c++",
        optional=True,
    )]


setup(ext_modules=[Extension("edgeft._sgemm", sources=["edgeft/_sgemm.c"], optional=True), *kernels_extension()])
