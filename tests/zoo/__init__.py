"""The test zoo: CNNs written from their published descriptions by hand (none imported
from a model zoo), CIFAR-size (3x32x32 in, 10 classes), tiny widths. ZOO maps a name to
a zero-argument factory."""
from .classic import ARCHS as _CLASSIC
from .detector import ARCHS as _DETECTOR
from .mobile import ARCHS as _MOBILE
from .other import ARCHS as _OTHER

ZOO = {**_CLASSIC, **_MOBILE, **_OTHER, **_DETECTOR}
