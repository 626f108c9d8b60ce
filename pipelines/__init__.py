"""CIFAR-10 data: `load_cifar10` (files -> arrays) and `make_loader` (arrays -> DALI batches)."""
from .dali import CIFAR10_MEAN, CIFAR10_STD, Augment, make_loader
from .data import CLASSES, DataError, load_cifar10

__all__ = ["Augment", "make_loader", "load_cifar10", "DataError", "CLASSES", "CIFAR10_MEAN", "CIFAR10_STD"]
