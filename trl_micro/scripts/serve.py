r"""
`trl-micro serve`: a MiCRo checkpoint as a reward service (`trl_micro.serving`: endpoints, batching, refusals).

    trl-micro serve --model_name_or_path micro-rm [--online_router stage2/online_router.json \
        --residual_heads stage2/residual_heads.json --user_field labels --allow_feedback] [--host 127.0.0.1 --port 5000]

OpenRLHF (0.11): `--reward.remote_url http://127.0.0.1:5000/get_reward`, with `--user_field labels` when the
dataset's label column carries each prompt's user id. verl: `trl_micro.serving.verl_reward.compute_score` as the custom reward
function (see its docstring). The server binds 127.0.0.1 unless `--host` says otherwise; on any other address give it
`--api_key` (or `$TRL_MICRO_API_KEY`), which every request but `/health` must then send as a bearer token.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from ..bundled.catalog import resolve_model_path
from ..online_router import OnlineRouter
from ..rewards import MiCRoReward

API_KEY_ENV = "TRL_MICRO_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
logger = logging.getLogger(__name__)


@dataclass
class ServeArguments:
    model_name_or_path: str = field(metadata={"help": "A MiCRo checkpoint (local path or Hub id), or `embedded`."})
    online_router: str | None = field(
        default=None,
        metadata={"help": "Online-router store (JSON) routing users; with --allow_feedback, created if missing."},
    )
    residual_heads: str | None = field(default=None, metadata={"help": "Residual-head store (JSON), per user."})
    user_field: str | None = field(
        default=None, metadata={"help": "Field of /get_reward requests holding each row's user id (e.g. labels)."}
    )
    allow_feedback: bool = field(default=False, metadata={"help": "Accept POST /feedback (updates --online_router)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (default: this machine only)."})
    port: int = field(default=5000, metadata={"help": "Port to bind."})
    api_key: str | None = field(
        default=None, metadata={"help": f"Bearer token every request must send (default: ${API_KEY_ENV}, else none)."}
    )
    max_batch_size: int = field(default=32, metadata={"help": "Rows scored together at most (dynamic batching)."})
    max_wait_ms: float = field(default=5.0, metadata={"help": "How long a request waits for others to batch with."})
    max_rows_per_request: int = field(default=1024, metadata={"help": "Rows one request may carry (else 413)."})
    max_request_bytes: int = field(default=16 * 2**20, metadata={"help": "Largest request body (else 413)."})
    max_length: int | None = field(default=None, metadata={"help": "Longest scored sequence in tokens."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per backbone pass."})


def build_app(args: ServeArguments):
    from ..serving import ServeSettings, create_app

    if args.allow_feedback and not args.online_router:
        raise ValueError(
            "--allow_feedback updates an online-router store: pass --online_router PATH (created if missing)."
        )
    model_path = resolve_model_path(args.model_name_or_path)
    router = None
    if args.online_router:
        if os.path.exists(args.online_router):
            router = args.online_router
        elif args.allow_feedback:
            from ..modeling_micro import MiCRoRewardModel

            router = OnlineRouter(num_heads=MiCRoRewardModel.from_pretrained(model_path).num_heads)
        else:
            raise FileNotFoundError(
                f"--online_router {args.online_router} does not exist (with --allow_feedback it is created)."
            )
    has_user_state = router is not None or args.residual_heads is not None
    reward = MiCRoReward.from_pretrained(
        model_path,
        user_column="user" if has_user_state else None,
        online_router=router,
        residual_heads=args.residual_heads,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    settings = ServeSettings(
        user_field=args.user_field,
        allow_feedback=args.allow_feedback,
        store_path=args.online_router,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        max_rows_per_request=args.max_rows_per_request,
        max_request_bytes=args.max_request_bytes,
    )
    if args.host not in LOOPBACK and settings.api_key is None:
        logger.warning(
            "Serving on %s without --api_key: anyone who reaches this address can score and send feedback.", args.host
        )
    return create_app(reward, settings)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    (args,) = HfArgumentParser(ServeArguments).parse_args_into_dataclasses(args=argv)
    app = build_app(args)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
