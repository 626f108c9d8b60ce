"""CIFAR-10 data: `load_cifar10` (files -> arrays) and `make_loader` (arrays -> DALI batches).

The DALI half (`make_loader`) is imported when first asked for: it brings torch and DALI
(seconds), which `make data`, the file readers and the configuration do not need."""
from .augment import Augment
from .data import CLASSES, MEAN, SIZE, STD, DataError, load_cifar10, subset, synthetic_cifar

__all__ = ["Augment", "make_loader", "load_cifar10", "DataError", "CLASSES", "MEAN", "STD", "SIZE", "subset",
           "synthetic_cifar"]


def __getattr__(name):
    if name == "make_loader":
        from . import dali

        return getattr(dali, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
