"""`python -m net`: layer table, parameters, receptive field and MACs; `--json` for machines."""
import argparse
import json

from . import build_model, count_macs, count_params, receptive_field


def main():
    parser = argparse.ArgumentParser(prog="python -m net", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print only {params, receptive_field, macs}")
    args = parser.parse_args()
    model = build_model()
    facts = {"params": count_params(model), "receptive_field": receptive_field(model), "macs": count_macs(model)}
    if args.json:
        print(json.dumps(facts))
        return
    from torchsummary import summary

    summary(model, (3, 32, 32), device="cpu")
    print(f"parameters       {facts['params']:,}  (limit 200,000)")
    print(f"receptive field  {facts['receptive_field']} px  (needs > 44)")
    print(f"MACs / image     {facts['macs']:,}  (32x32, forward)")


if __name__ == "__main__":
    main()
