"""CIFAR-10 data: `load_cifar10` (files -> arrays) and `make_loader` (arrays -> DALI batches)."""
from .dali import Augment, make_loader
from .data import CLASSES, MEAN, SIZE, STD, DataError, load_cifar10, subset, synthetic_cifar

__all__ = ["Augment", "make_loader", "load_cifar10", "DataError", "CLASSES", "MEAN", "STD", "SIZE", "subset",
           "synthetic_cifar"]
