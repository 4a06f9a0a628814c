"""
Stage 2: adapt the router of a Stage 1 MiCRo checkpoint to contexts (users, criteria, personas) from a few
context-labelled pairs; backbone and heads stay frozen. The code is `trl_micro/scripts/adapt.py`, installed as
`trl-micro adapt`.

    python recipes/adapt_router.py \
        --model_name_or_path outputs/micro-rm --dataset_name trl-micro/hh_relabeled \
        --pairs_per_context 32 --output_dir outputs/micro-rm-adapted

In a checkout, the built-in real datasets read the checkout's ../shared/data unless TRL_MICRO_DATA_DIR says otherwise.
"""

import os
from pathlib import Path

CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if CHECKOUT_DATA.is_dir():
    os.environ.setdefault("TRL_MICRO_DATA_DIR", str(CHECKOUT_DATA))

from trl_micro.scripts.adapt import main, make_parser  # noqa: E402

if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
