"""edgeft: fine-tune small language models on a laptop and ship them as GGUF."""

from edgeft import _blas

# Must happen before anything imports mlx: see edgeft/_blas.py.
_blas.ensure()

__version__ = "0.1.0"
