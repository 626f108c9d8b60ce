"""Hand a trained model on: `python export.py runs/<name>` (`make export RUN=runs/<name>`) writes it
as ONNX, for use outside this project (onnxruntime, TensorRT, a browser).

Input "images": float32 (batch, 3, 32, 32), any batch size, normalized as the trainer's pipeline
does it: (pixel - MEAN) / STD per channel, RGB, values of pixels 0..255. Output "logits": (batch,
10), in the class order of pipelines.CLASSES. Needs the `export` extra (pip install -e '.[export]').
"""
import argparse
import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import torch

from engine.checkpoint import add_run_flags, load_weights, write_atomic
from engine.cli import run_main
from engine.config import UserError
from net import build_model


def main(argv=None):
    parser = argparse.ArgumentParser(prog="export.py", description=__doc__.splitlines()[0])
    add_run_flags(parser)
    parser.add_argument("--out", help="the .onnx file (default: beside the checkpoint, <checkpoint>.onnx)")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("onnxscript") is None:  # what torch's ONNX exporter is built on
        raise UserError("ONNX export needs the export extra: pip install -e '.[export]'")
    weights, _, _, cfg = load_weights(args.run, args.checkpoint, args.weights)
    model = build_model(dropout=cfg.dropout).eval()
    model.load_state_dict(weights)
    out = Path(args.out or Path(args.run) / f"{args.checkpoint}.onnx")
    example = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1)

    def export(tmp):
        with warnings.catch_warnings():  # the exporter's notes on what it did not need (torchvision ops, ...)
            warnings.simplefilter("ignore")
            logging.disable(logging.WARNING)
            try:
                program = torch.onnx.export(model, (example,), dynamo=True, input_names=["images"],
                                            output_names=["logits"], dynamic_shapes=({0: batch},), verbose=False)
            finally:
                logging.disable(logging.NOTSET)
        program.save(tmp)

    write_atomic(out, export)
    print(f"wrote {out}: float32 images (batch, 3, 32, 32), normalized -> logits (batch, 10)")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
