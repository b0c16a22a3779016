"""Fetch and convert the demo model once: `python scripts/fetch_demo_model.py [--root DIR]`.

Same as `hotswap models fetch-demo`. Prints the model dir on the last line.
"""

import argparse
from pathlib import Path

from hotswap.demo_model import fetch_demo_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=None, help="models dir (default: ~/.cache/hotswap/models)")
    args = parser.parse_args()
    print(fetch_demo_model(args.root))


if __name__ == "__main__":
    main()
