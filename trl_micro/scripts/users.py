r"""
`trl-micro users`: the user store (`trl_micro.personalization.stores`) from the shell.

    trl-micro users import stage2/online_router.json --user_store sqlite:///users.db [--residual_heads FILE]
    trl-micro users export --user_store sqlite:///users.db --output routing.json [--residual_output FILE]
    trl-micro users rebuild --user_store sqlite:///users.db --model new-micro-rm
    trl-micro users delete alice --user_store sqlite:///users.db
    trl-micro users info --user_store sqlite:///users.db

`import` migrates the JSON files of `UserAdaptation.save` (and of earlier releases' `trl-micro serve`) into a store;
`export` writes them back (the whole store: for backups and moving between backends); `rebuild` replays the feedback
log through a new checkpoint's heads (`trl_micro.personalization.rebuild`); `delete` removes one user's routing,
residual head and logged comparisons. Each prints one JSON line saying what it did.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROUTER_FORMAT = "trl-micro-online-router"
RESIDUAL_FORMAT = "trl-micro-residual-heads"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-micro users", description="Manage a user store (Stage 2 state).")
    commands = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--user_store", required=True, help="The store's URL: sqlite:///path/users.db or postgresql://..."
        )
        return command

    imported = add("import", "write a JSON routing file (and residual heads) into the store")
    imported.add_argument("file", help="online_router.json or residual_heads.json (UserAdaptation.save)")
    imported.add_argument("--residual_heads", default=None, help="a residual_heads.json to import as well")
    exported = add("export", "write the store's routing (and residual heads) as JSON files")
    exported.add_argument("--output", required=True, help="where the routing JSON goes")
    exported.add_argument("--residual_output", default=None, help="where the residual heads' JSON goes")
    rebuilt = add("rebuild", "replay the feedback log through a new checkpoint's heads")
    rebuilt.add_argument("--model", required=True, help="the new MiCRo checkpoint (path, Hub id or `embedded`)")
    rebuilt.add_argument("--feature_dir", default=None, help="feature store root (default $TRL_MICRO_CACHE/features)")
    rebuilt.add_argument("--batch_size", type=int, default=16, help="sequences per backbone pass")
    rebuilt.add_argument("--max_length", type=int, default=None, help="longest sequence in tokens, as served")
    rebuilt.add_argument("--no_residuals", action="store_true", help="drop residual heads instead of refitting them")
    deleted = add("delete", "remove a user's routing, residual head and logged comparisons")
    deleted.add_argument("user", help="the user id")
    add("info", "the store's settings and sizes")
    return parser


def run_users(args: argparse.Namespace) -> dict:
    from ..personalization.residual_heads import ResidualHeads
    from ..personalization.stores import UserStore

    store = UserStore(args.user_store)
    try:
        if args.command == "import":
            return import_files(store, [args.file] + ([args.residual_heads] if args.residual_heads else []))
        if args.command == "export":
            router = store.to_online_router()
            router.save(args.output)
            answer = {"users": len(router), "output": args.output}
            if args.residual_output:
                residuals = store.to_residual_heads()
                if residuals is None:
                    residuals = ResidualHeads(hidden_size=1)
                    answer["residual_users"] = 0
                else:
                    answer["residual_users"] = len(residuals)
                residuals.save(args.residual_output)
            return answer
        if args.command == "rebuild":
            return rebuild(store, args)
        if args.command == "delete":
            removed = store.delete_user(args.user)
            if not removed["user"] and not removed["comparisons"]:
                raise KeyError(f"The user store {store.display_url} has no user {args.user!r}.")
            return {"deleted": args.user, **removed}
        settings = store.settings
        return {
            "url": store.display_url,
            "users": len(store),
            "comparisons": store.count_comparisons(),
            "num_heads": settings.num_heads,
            "model_fingerprint": settings.model_fingerprint,
            "residual_hidden_size": settings.hidden_size,
        }
    finally:
        store.close()


def import_files(store, paths: list[str]) -> dict:
    """Import routing files first (they create the store's settings), then residual heads."""
    from ..personalization.online_router import OnlineRouter
    from ..personalization.residual_heads import ResidualHeads

    kinds = {}
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist.")
        with open(path, encoding="utf-8") as file:
            found = json.load(file).get("format") if path.endswith(".json") else None
        if found not in (ROUTER_FORMAT, RESIDUAL_FORMAT):
            raise ValueError(f"{path} is not a trl-micro routing or residual-heads JSON file (format {found!r}).")
        kinds[path] = found
    answer = {}
    for path in sorted(paths, key=lambda p: kinds[p] != ROUTER_FORMAT):
        if kinds[path] == ROUTER_FORMAT:
            answer["users"] = store.import_router(OnlineRouter.load(path))
        else:
            answer["residual_users"] = store.import_residuals(ResidualHeads.load(path))
    return answer


def rebuild(store, args: argparse.Namespace) -> dict:
    from ..bundled.catalog import resolve_model_path
    from ..personalization.rebuild import rebuild_user_store
    from ..rewards import MiCRoReward

    reward = MiCRoReward.from_pretrained(
        resolve_model_path(args.model), context_column=None, batch_size=args.batch_size, max_length=args.max_length
    )
    report = rebuild_user_store(
        store, reward.model, reward.encode, args.feature_dir, args.batch_size, refit_residuals=not args.no_residuals
    )
    return report.__dict__


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        answer = run_users(args)
    except (FileNotFoundError, KeyError, TypeError, ValueError) as error:
        print(f"trl-micro users {args.command}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(answer))
    return 0
