"""The toy world's fairness check (docs/toy.md, "A fair instrument"): run any tsopsd command with the toy families
drawn with other weights, e.g. balanced, so that half the RL prompts reward the bracket family's plan L.

    python scripts/toy_balanced_check.py 0.45,0.45,0.10 rl runs/x/base --recipe recipes/rl/toy.yaml --out runs/x/bal

The weights are precedence,bracket,neutral (the shipped world: 0.7,0.15,0.15, before the distinct-problem pools
reshape them). Every problem the command draws -- training prompts and validation problems -- uses them; measure
the result on the natural test set with scripts/toy_families.py.
"""

from __future__ import annotations

import sys


def main() -> int:
    from tsopsd_cli.cli.app import main as cli_main
    from tsopsd_cli.tasks import toy

    weights = [float(x) for x in sys.argv[1].split(",")]
    toy.FAMILY_WEIGHTS.update(zip(("precedence", "bracket", "neutral"), weights))
    sys.argv = ["tsopsd", *sys.argv[2:]]
    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
