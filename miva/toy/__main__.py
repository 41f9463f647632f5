"""`python -m miva.toy train-base ...` | `python -m miva.toy export [--out DIR]`"""

import argparse
import sys

from .base import ASSET, export_checkpoint
from .train_base import main

if len(sys.argv) >= 2 and sys.argv[1] == "train-base":
    main(sys.argv[2:])
elif len(sys.argv) >= 2 and sys.argv[1] == "export":
    parser = argparse.ArgumentParser(prog="python -m miva.toy export", description="export the EMA weights of a checkpoint")
    parser.add_argument("--out", default=str(ASSET))
    print(export_checkpoint(parser.parse_args(sys.argv[2:]).out))
else:
    sys.exit("usage: python -m miva.toy train-base [--steps N] [--resume] [--out DIR] | python -m miva.toy export [--out DIR]")
