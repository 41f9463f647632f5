"""`python -m miva.toy train-base ...` | `python -m miva.toy export [--run DIR] [--out DIR]`"""

import argparse
import sys

from .base import ASSET, export_checkpoint
from .train_base import RUN, main

if len(sys.argv) >= 2 and sys.argv[1] == "train-base":
    main(sys.argv[2:])
elif len(sys.argv) >= 2 and sys.argv[1] == "export":
    parser = argparse.ArgumentParser(prog="python -m miva.toy export", description="export the EMA weights of a checkpoint")
    parser.add_argument("--run", default=str(RUN), help="folder holding the training checkpoint")
    parser.add_argument("--out", default=str(ASSET), help="folder to write model.safetensors, config.json and loss.png to")
    args = parser.parse_args(sys.argv[2:])
    print(export_checkpoint(args.run, args.out))
else:
    sys.exit("usage: python -m miva.toy train-base [--steps N] [--resume] [--run DIR] [--out DIR] | "
             "python -m miva.toy export [--run DIR] [--out DIR]")
