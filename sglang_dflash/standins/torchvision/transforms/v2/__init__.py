from ..._missing import missing
from . import functional  # noqa: F401

__getattr__ = missing("torchvision.transforms.v2")
