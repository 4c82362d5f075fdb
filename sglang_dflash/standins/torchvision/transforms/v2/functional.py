from ..._missing import missing
from .. import InterpolationMode  # noqa: F401

__getattr__ = missing("torchvision.transforms.v2.functional")
