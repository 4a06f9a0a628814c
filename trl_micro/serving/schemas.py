"""
The server's request and answer models: strict (a wrong type is a 422, never coerced), with examples for the schema
pages and the fuzzer, and the error answers each route documents.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Text = StrictStr | list[dict[str, Any]]
UserId = StrictStr | StrictInt
STRICT = ConfigDict(strict=True)


def examples(*values: dict) -> ConfigDict:
    """Strict request models, with examples for the schema (and for the fuzzer's explicit phase)."""
    return ConfigDict(strict=True, json_schema_extra={"examples": list(values)})


class OpenRLHFRequest(BaseModel):
    # OpenRLHF may add fields; the user field (`--user_field`) is one of them
    model_config = ConfigDict(
        **examples(
            {"query": ["How do I boil an egg? Simmer it."], "prompts": ["How do I boil an egg?"], "labels": ["alice"]}
        ),
        extra="allow",
    )
    query: list[StrictStr]
    prompts: list[StrictStr] | None = None
    labels: list[Any] | None = None


class Row(BaseModel):
    model_config = STRICT
    prompt: Text
    completion: Text
    user: UserId | None = None
    context: StrictStr | None = None


class ScoreRequest(BaseModel):
    model_config = examples(
        {
            "rows": [{"prompt": "How do I boil an egg?", "completion": " Simmer it.", "user": "alice"}],
            "return_heads": True,
        },
        {
            "rows": [
                {
                    "prompt": [{"role": "user", "content": "How do I boil an egg?"}],
                    "completion": [{"role": "assistant", "content": "Simmer it for nine minutes."}],
                    "user": 17,
                    "context": "Answers short and plain.",
                }
            ]
        },
    )
    rows: list[Row]
    return_heads: StrictBool = False


class Comparison(BaseModel):
    model_config = STRICT
    user: UserId
    prompt: Text
    chosen: Text
    rejected: Text
    context: StrictStr | None = None
    comparison_id: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None


class FeedbackRequest(BaseModel):
    model_config = examples(
        {
            "comparisons": [
                {
                    "user": "alice",
                    "prompt": "How do I boil an egg?",
                    "chosen": " Simmer it for nine minutes.",
                    "rejected": " Boil it.",
                    "comparison_id": "alice-0001",
                }
            ]
        }
    )
    comparisons: list[Comparison]


# ----------------------------------------------------------------------------------------------------- answers
class RerankLine(BaseModel):
    model_config = STRICT
    prompt: Text
    candidates: Annotated[list[Text], Field(min_length=1)]
    users: Annotated[list[UserId | None], Field(min_length=1)] | None = None
    context: StrictStr | None = None


class RerankRequest(BaseModel):
    model_config = examples(
        {
            "lines": [
                {
                    "prompt": "How do I boil an egg?",
                    "candidates": [" Simmer it for nine minutes.", " Put it in water, heat it and wait."],
                    "users": ["alice", "bob", None],
                }
            ]
        }
    )
    lines: list[RerankLine]


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorAnswer(BaseModel):
    detail: str | list[ErrorItem]


class GetRewardAnswer(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class ScoreAnswer(BaseModel):
    rewards: list[float]
    online_routed: list[bool]
    head_rewards: list[list[float]] | None = None
    mixture_weights: list[list[float]] | None = None


class RerankPick(BaseModel):
    line: int
    user: str | None
    best: int
    scores: list[float]
    online_routed: bool


class RerankAnswer(BaseModel):
    picks: list[RerankPick]


class FeedbackAnswer(BaseModel):
    updated: list[str]
    comparisons: int
    duplicates: int
    num_updates: dict[str, int]


class HealthAnswer(BaseModel):
    status: str
    num_heads: int
    feedback: bool
    reason: str | None = None


def error_answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "The body could not be decoded (not UTF-8 text, or JSON nesting or numbers Python cannot hold).",
        401: "Missing or wrong bearer token (with --api_key).",
        403: "Feedback is off on this server.",
        408: "The body did not arrive within --body_timeout_s.",
        413: "Over --max_request_bytes or --max_rows_per_request.",
        422: "A malformed body or a row the reward refuses, named in `detail`.",
        503: "Overloaded (--max_queued_rows, --max_concurrent_requests), past --request_timeout_s, or the user store "
        "unavailable: retry after `Retry-After` seconds.",
    }
    return {status: {"model": ErrorAnswer, "description": descriptions[status]} for status in statuses}


POST_ERRORS = (400, 401, 408, 413, 422, 503)

# Where each list `MiCRoReward.encode_rows` names sits in each endpoint's request ("{row}" is the row's index).
SCORE_FIELDS = {
    "prompts": "rows[{row}].prompt",
    "completions": "rows[{row}].completion",
    "contexts": "rows[{row}].context",
    "users": "rows[{row}].user",
}
FEEDBACK_FIELDS = {
    "prompts": "comparisons[{row}].prompt",
    "chosen": "comparisons[{row}].chosen",
    "rejected": "comparisons[{row}].rejected",
    "contexts": "comparisons[{row}].context",
    "users": "comparisons[{row}].user",
    "comparison_ids": "comparisons[{row}].comparison_id",
}
RERANK_FIELDS = {"prompts": "lines[{row}].prompt", "contexts": "lines[{row}].context"}


def rerank_fields(num_lines: int) -> dict[str, str]:
    """`RERANK_FIELDS` plus where each line's candidates and users sit (`MiCRoReward.rerank` names them by line)."""
    fields = dict(RERANK_FIELDS)
    for line in range(num_lines):
        fields[f"candidates[{line}]"] = f"lines[{line}].candidates[{{row}}]"
        fields[f"users[{line}]"] = f"lines[{line}].users[{{row}}]"
    return fields
