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
`--api_key` (or `$TRL_MICRO_API_KEY`), which every request but `/health` must then send as a bearer token (an empty
key is refused at start). Every limit below has a flag and a default; docs/serving.md lists them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, fields

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
    max_request_bytes: int = field(
        default=16 * 2**20, metadata={"help": "Largest request body in bytes, counted as it arrives (else 413)."}
    )
    max_queued_rows: int = field(
        default=4096, metadata={"help": "Rows admitted and not yet answered, all requests together (else 503)."}
    )
    max_concurrent_requests: int = field(
        default=64, metadata={"help": "POST requests handled at once; their bodies are in memory (else 503)."}
    )
    max_connections: int = field(
        default=256, metadata={"help": "Open connections and requests at most (uvicorn's limit; else 503)."}
    )
    request_timeout_s: float = field(
        default=60.0, metadata={"help": "Seconds a request may wait for its scores (else 503, its rows dropped)."}
    )
    body_timeout_s: float = field(
        default=30.0, metadata={"help": "Seconds a request body may take to arrive after its headers (else 408)."}
    )
    header_timeout_s: float = field(
        default=10.0,
        metadata={"help": "Seconds a connection may take to send a request's headers (else it is closed)."},
    )
    serve_openapi: bool = field(
        default=False, metadata={"help": "Serve /openapi.json and /docs (behind --api_key like every endpoint)."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Longest scored sequence in tokens."})
    max_text_chars: int | None = field(
        default=None,
        metadata={
            "help": "Longest text tokenized, in characters (default: --max_length times the tokenizer's longest "
            "token, which cuts only texts that --max_length cuts anyway)."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Sequences per backbone pass."})


def api_key(args: ServeArguments) -> str | None:
    """The bearer token: `--api_key`, else `$TRL_MICRO_API_KEY`, else none; an empty one is an error."""
    from ..serving.app import check_api_key

    if args.api_key is not None:
        check_api_key(args.api_key, "--api_key")
        return args.api_key
    key = os.environ.get(API_KEY_ENV)
    if key is not None:
        check_api_key(key, f"${API_KEY_ENV}")
    return key


def build_app(args: ServeArguments):
    from ..serving import ServeSettings, create_app

    # Every ServeSettings field is the flag of its name; the settings are checked before the model loads.
    values = {setting.name: getattr(args, setting.name) for setting in fields(ServeSettings)}
    settings = ServeSettings(**{**values, "api_key": api_key(args)})
    settings.check()
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
    reward = MiCRoReward.for_user_ids(
        model_path,
        user_store=args.user_store,
        store_staleness_s=args.store_staleness_s,
        online_router=args.online_router,
        residual_heads=args.residual_heads,
        batch_size=args.batch_size,
        max_length=args.max_length,
        max_chars=args.max_text_chars,
    )
    if args.host not in LOOPBACK and settings.api_key is None:
        logger.warning(
            "Serving on %s without --api_key: anyone who reaches this address can score and send feedback.", args.host
        )
    return create_app(reward, settings)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from ..serving import server_config

    (args,) = HfArgumentParser(ServeArguments).parse_args_into_dataclasses(args=argv)
    app = build_app(args)
    uvicorn.Server(server_config(app, host=args.host, port=args.port)).run()
    return 0
