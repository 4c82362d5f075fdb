"""DFlash block-diffusion speculative decoding for SGLang.

Importing this package is cheap on purpose (no torch, no sglang): SGLang loads the
plugin entry point in every process, and the CPU-lane boot hook imports it at
interpreter start.
"""

__version__ = "0.1.0"

# The one SGLang release this package's host layer (``host/``) is written against.
SGLANG_VERSION = "0.5.23"
