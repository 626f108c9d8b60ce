"""The seed CNN. Front door: `build_model()`; `python -m net` prints its summary."""
from .model import build_model, count_macs, count_params, receptive_field

__all__ = ["build_model", "count_macs", "count_params", "receptive_field"]
