"""`python -m net`: the block table, torchsummary's layer table, parameters, receptive field, MACs.

`--json` prints only {params, receptive_field, macs}, for machines.
"""
import argparse
import json

from . import build_model, count_macs, count_params, receptive_field
from .model import block_table


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m net", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print only {params, receptive_field, macs}")
    args = parser.parse_args(argv)
    model = build_model()
    facts = {"params": count_params(model), "receptive_field": receptive_field(model), "macs": count_macs(model)}
    if args.json:
        print(json.dumps(facts))
        return
    rows = [("block", "conv (3x3)", "depthwise (3x3)", "pointwise (1x1)", "params")]
    rows += [(*r[:4], f"{r[4]:,}") for r in block_table(model)] + [("total", "", "", "", f"{facts['params']:,}")]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for i, r in enumerate(rows):
        print("  ".join(c.rjust(w) if j == 4 else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))).rstrip())
        if i == 0 or i == len(rows) - 2:
            print("-" * (sum(widths) + 8))
    print("\nEvery conv: no bias, padding = dilation, then BatchNorm, ReLU, Dropout; every map stays 32x32.\n")
    from torchsummary import summary

    summary(model, (3, 32, 32), device="cpu")  # the layer table the original design printed
    print(f"parameters       {facts['params']:,}  (limit 200,000)")
    print(f"receptive field  {facts['receptive_field']} px  (needs > 44)")
    print(f"MACs / image     {facts['macs']:,}  (32x32, forward)")


if __name__ == "__main__":
    main()
