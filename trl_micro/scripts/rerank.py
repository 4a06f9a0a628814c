r"""
`trl-micro rerank`: personalized best-of-n over a JSONL file (`MiCRoReward.rerank`, `trl_micro.reranking`).

    trl-micro rerank --model_name_or_path micro-rm --input candidates.jsonl --output picks.jsonl \
        [--user_store sqlite:///users.db | --online_router online_router.json --residual_heads residual_heads.json]

Each input line is a JSON object: `prompt` (text or chat messages), `candidates` (a non-empty list of completions of
the prompt's kind), and optionally `users` (the user ids who rank them; absent or null: one ranking by the model's
router), `context` (text joined to the prompt as in training) and `id` (copied to the output). Each candidate goes
through the backbone once, however many users rank it.

Each output line is one user's pick for one input line: `line` (1-based), `id`, `user`, `best` (the index of the
picked candidate), `scores` (every candidate's reward for that user) and `online_routed` (whether the user state knew
the user; if not, the model's router routed the prompt). A malformed line stops the command with its line number and
what to fix; nothing is written then.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROW_KEYS = ("prompt", "candidates", "users", "context", "id")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-micro rerank", description="Pick the best of each line's candidates for each of its users."
    )
    parser.add_argument(
        "--model_name_or_path", required=True, help="A MiCRo checkpoint (path or Hub id), or `embedded`."
    )
    parser.add_argument("--input", required=True, help="JSONL: prompt, candidates, users, context, id per line.")
    parser.add_argument("--output", required=True, help="JSONL written: one line per input line and user.")
    parser.add_argument("--user_store", default=None, help="User store URL (sqlite:///users.db or postgresql://...).")
    parser.add_argument("--online_router", default=None, help="Routing JSON file (UserAdaptation.save), no store.")
    parser.add_argument("--residual_heads", default=None, help="Residual heads JSON file, no store.")
    parser.add_argument("--batch_size", type=int, default=16, help="Sequences per backbone pass.")
    parser.add_argument("--max_length", type=int, default=None, help="Longest scored sequence in tokens.")
    parser.add_argument("--lines_per_call", type=int, default=64, help="Input lines reranked together.")
    parser.add_argument(
        "--feature_dir", default=None, help="Keep and reuse the candidates' backbone readings in this feature store."
    )
    return parser


def read_rows(path: str) -> list[dict]:
    """The input lines, checked for their shape (the texts are checked when encoded); errors name the line."""
    if not os.path.isfile(path):
        raise SystemExit(f"--input {path} does not exist.")
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path} line {number}: not JSON ({error.msg}).") from None
            problem = row_problem(row)
            if problem:
                raise SystemExit(f"{path} line {number}: {problem}")
            rows.append({**row, "line": number})
    if not rows:
        raise SystemExit(f"{path} has no lines to rerank.")
    return rows


def row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"a line must be a JSON object with {', '.join(ROW_KEYS[:2])}, got {type(row).__name__}."
    unknown = sorted(set(row) - set(ROW_KEYS))
    if unknown:
        return f"unknown keys {unknown}; a line has {', '.join(ROW_KEYS)}."
    if "prompt" not in row:
        return "`prompt` is missing."
    candidates = row.get("candidates")
    if not isinstance(candidates, list):
        return f"`candidates` must be a list of completions, got {type(candidates).__name__}."
    if not candidates:
        return "`candidates` is empty: give at least one candidate to pick from."
    users = row.get("users")
    if users is not None and (not isinstance(users, list) or not users):
        return "`users` must be a non-empty list of user ids (or absent: the model's router ranks once)."
    return None


def main(argv: list[str] | None = None) -> int:
    from ..bundled.catalog import resolve_model_path
    from ..feature_cache import FeatureStore
    from ..reward_inputs import InvalidRow
    from ..rewards import MiCRoReward

    args = make_parser().parse_args(argv)
    if args.lines_per_call < 1:
        raise SystemExit(f"--lines_per_call must be >= 1, got {args.lines_per_call}.")
    rows = read_rows(args.input)
    reward = MiCRoReward.for_user_ids(
        resolve_model_path(args.model_name_or_path),
        user_store=args.user_store,
        online_router=args.online_router,
        residual_heads=args.residual_heads,
        batch_size=args.batch_size,
        max_length=args.max_length,
    )
    store = FeatureStore(reward.model, args.feature_dir) if args.feature_dir else None
    records = []
    for start in range(0, len(rows), args.lines_per_call):
        chunk = rows[start : start + args.lines_per_call]
        try:
            ranked = reward.rerank(
                [row["prompt"] for row in chunk],
                [row["candidates"] for row in chunk],
                users=[row.get("users") or [None] for row in chunk],
                contexts=[row.get("context") for row in chunk],
                feature_store=store,
            )
        except InvalidRow as error:  # `candidates[i][j]`, `prompts[i]`, `users[i][j]`: i is the chunk's row
            name, _, rest = error.name.partition("[")
            index = int(rest.rstrip("]")) if rest else error.row
            where = f"`{name}[{error.row}]`" if rest else f"`{name}`"
            raise SystemExit(f"{args.input} line {chunk[index]['line']}: {where} {error.problem}") from None
        for record in ranked.to_records():
            row = chunk[record.pop("prompt_index")]
            records.append({"line": row["line"], "id": row.get("id"), **record})
    with open(args.output, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    print(json.dumps({"lines": len(rows), "picks": len(records), "output": args.output}), file=sys.stderr)
    return 0
