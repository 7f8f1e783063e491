"""`python -m trainer {data shapesqa | fit | eval} ...`"""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m trainer COMMAND [options]

commands:
  data shapesqa   generate a ShapesQA data set (train/val/test splits in JSONL)
  fit             train a fusion model on a JSONL data set and export a model package
  eval            evaluate a model package on a JSONL data set
"""


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], list(argv[1:])
    if command == "data" and rest[:1] == ["shapesqa"]:
        from trainer.shapesqa import generate_main

        return generate_main(rest[1:])
    if command == "fit":
        from trainer.fit import fit_main

        return fit_main(rest)
    if command == "eval":
        from trainer.evaluate import eval_main

        return eval_main(rest)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
