"""`make data` (`python -m pipelines.fetch`): download CIFAR-10, or import a local copy.

Its own module, not part of `pipelines/__init__`: running an already-imported module with
`-m` makes Python print a warning, and a user's error output should be one line.
"""
import argparse
import sys
from pathlib import Path

from .data import BINARY, DataError, download, import_copy, load_cifar10


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pipelines.fetch",
                                     description="Download CIFAR-10 (binary tarball, md5-checked) "
                                                 "or import a local copy.")
    parser.add_argument("--out", default="data", help="data folder (default: data)")
    parser.add_argument("--src", default=None,
                        help="import this tarball, extracted folder or image tree instead of downloading")
    parser.add_argument("--url", default=BINARY["url"], help=argparse.SUPPRESS)
    parser.add_argument("--md5", default=BINARY["md5"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        if args.src:
            import_copy(args.src, args.out)
        else:
            dest = download(args.url, Path(args.out) / BINARY["name"], args.md5)
            print(f"{dest}: train {len(load_cifar10(dest, 'train')[1]):,} + test "
                  f"{len(load_cifar10(dest, 'test')[1]):,} images")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # the user's to fix, as in every entry point of the project
    return 0


if __name__ == "__main__":
    sys.exit(main())
