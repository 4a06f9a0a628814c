r"""
`trl-micro serve`: a MiCRo checkpoint as a reward service (`trl_micro.serving`: endpoints, batching, refusals).

    trl-micro serve --model_name_or_path micro-rm [--user_store sqlite:///users.db --user_field labels \
        --allow_feedback] [--host 127.0.0.1 --port 5000]

Per-user state (routing, residual heads, the feedback log) lives in a user store named by URL (`--user_store`:
`sqlite:///path/users.db` on one host, `postgresql://...` for replicas on several); JSON files from
`UserAdaptation.save` can be served read-only (`--online_router`, `--residual_heads`) or imported into a store
(`trl-micro users import`).

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
from ..rewards import MiCRoReward

API_KEY_ENV = "TRL_MICRO_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
logger = logging.getLogger(__name__)


@dataclass
class ServeArguments:
    model_name_or_path: str = field(metadata={"help": "A MiCRo checkpoint (local path or Hub id), or `embedded`."})
    user_store: str | None = field(
        default=None,
        metadata={
            "help": "User store URL (sqlite:///users.db or postgresql://...): per-user routing, residual heads and "
            "the feedback log; created if missing."
        },
    )
    store_staleness_s: float = field(
        default=0.5, metadata={"help": "How old a user's weights read from --user_store may be, in seconds."}
    )
    keep_features: bool = field(
        default=True,
        metadata={"help": "Keep the backbone readings of feedback in the feature store (a rebuild reads them)."},
    )
    feature_dir: str | None = field(
        default=None, metadata={"help": "Feature store root for --keep_features (default: $TRL_MICRO_CACHE/features)."}
    )
    online_router: str | None = field(
        default=None, metadata={"help": "Read-only routing from a JSON file (UserAdaptation.save), no --user_store."}
    )
    residual_heads: str | None = field(
        default=None, metadata={"help": "Read-only residual heads from a JSON file, no --user_store."}
    )
    user_field: str | None = field(
        default=None, metadata={"help": "Field of /get_reward requests holding each row's user id (e.g. labels)."}
    )
    allow_feedback: bool = field(default=False, metadata={"help": "Accept POST /feedback (recorded in --user_store)."})
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

    if args.allow_feedback and not args.user_store:
        migrate = (
            f" Import the JSON routing first: `trl-micro users import {args.online_router} --user_store URL`."
            if args.online_router
            else ""
        )
        raise ValueError(
            "--allow_feedback records comparisons in a user store: pass --user_store URL (e.g. sqlite:///users.db, "
            f"created if missing).{migrate}"
        )
    if args.user_store and (args.online_router or args.residual_heads):
        raise ValueError(
            "Pass --user_store or the JSON files (--online_router / --residual_heads), not both: import the files "
            "into the store with `trl-micro users import FILE --user_store URL`."
        )
    model_path = resolve_model_path(args.model_name_or_path)
    if args.online_router and not os.path.exists(args.online_router):
        raise FileNotFoundError(f"--online_router {args.online_router} does not exist.")
    has_user_state = bool(args.user_store or args.online_router or args.residual_heads)
    reward = MiCRoReward.from_pretrained(
        model_path,
        user_column="user" if has_user_state else None,
        user_store=args.user_store,
        store_staleness_s=args.store_staleness_s,
        online_router=args.online_router,
        residual_heads=args.residual_heads,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    settings = ServeSettings(
        user_field=args.user_field,
        allow_feedback=args.allow_feedback,
        keep_features=args.keep_features,
        feature_dir=args.feature_dir,
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
