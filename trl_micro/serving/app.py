"""
The reward service: a FastAPI app over one [`MiCRoReward`], its endpoints, and its refusals.

- `POST /get_reward`: OpenRLHF's remote reward protocol. `{"query": [...], "prompts": [...], "labels": [...]}`,
  each query the prompt followed by the response in one text; answered `{"rewards", "scores", "extra_logs"}` with the
  per-head rewards in `extra_logs`. The user of each row is the request field `ServeSettings.user_field` names (e.g.
  `labels`, when the dataset's label column carries a user id); without one, rows are routed by the prompt.
- `POST /score`: rows of `prompt`, `completion` (text or messages), optional `user` and `context`; answered with the
  routed rewards and, with `"return_heads": true`, the per-head rewards and mixture weights.
- `POST /feedback` (only with `allow_feedback`): comparisons `(user, prompt, chosen, rejected[, context,
  comparison_id])` update that user's online routing in the user store (`trl_micro.personalization.stores`) and are
  logged there, in one transaction committed before the answer, on a thread of its own (`serving.feedback`): scoring
  never waits for a commit, a failed write changes nothing, and a comparison whose `comparison_id` is already logged
  is not applied again (its answer is repeated). Replicas on one store see each other's comparisons within the
  store's staleness bound (`--store_staleness_s`).
- `GET /health`, `GET /metrics` (Prometheus text: requests, rows, batch sizes, latency, fallback rows, feedback).

Rows of concurrent requests are scored together ([`DynamicBatcher`]). A user the online router does not know is
routed by the model's router, counted (`trl_micro_fallback_rows_total`) and logged once; never an error. A row longer
than `max_length` tokens is scored as `MiCRoReward` scores it in process: its prompt and ending kept, the middle of the
completion dropped. Malformed JSON, missing or mismatched fields, empty texts and oversized requests are answered with
a 4xx naming the field; the server stays up and nothing stored is touched.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import SQLAlchemyError

from ..feature_cache import FeatureStore
from ..personalization.stores import Comparison as StoredComparison
from ..rewards import MiCRoReward
from ..value_checks import normalize_user_id
from .batcher import DynamicBatcher
from .feedback import FeedbackRecorder
from .metrics import ServeMetrics

logger = logging.getLogger(__name__)

Text = str | list[dict[str, Any]]


@dataclass
class ServeSettings:
    """What the service accepts; see `trl_micro.scripts.serve.ServeArguments` for each field's meaning."""

    user_field: str | None = None
    allow_feedback: bool = False
    keep_features: bool = True
    feature_dir: str | None = None
    api_key: str | None = None
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_rows_per_request: int = 1024
    max_request_bytes: int = 16 * 2**20


class OpenRLHFRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenRLHF may add fields; the user field is one of them
    query: list[str]
    prompts: list[str] | None = None
    labels: list[Any] | None = None


class Row(BaseModel):
    prompt: Text
    completion: Text
    user: str | int | None = None
    context: str | None = None


class ScoreRequest(BaseModel):
    rows: list[Row]
    return_heads: bool = False


class Comparison(BaseModel):
    user: str | int
    prompt: Text
    chosen: Text
    rejected: Text
    context: str | None = None
    comparison_id: str | None = Field(default=None, min_length=1, max_length=256)


class FeedbackRequest(BaseModel):
    comparisons: list[Comparison]


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


def _check_text(value: Text, where: str) -> None:
    if isinstance(value, str):
        if not value.strip():
            raise _unprocessable(f"{where} is empty.")
    elif not value or not all(isinstance(m, dict) and str(m.get("content", "")).strip() for m in value):
        raise _unprocessable(f"{where} must be text or messages with content; it is empty or has an empty message.")


def openrlhf_rows(request: OpenRLHFRequest, user_field: str | None) -> list[dict]:
    """The rows of an OpenRLHF request: each query split into its prompt and the response after it."""
    if request.prompts is None:
        raise _unprocessable("`prompts` is missing: each query is split into the prompt and the response after it.")
    if len(request.prompts) != len(request.query):
        raise _unprocessable(f"`query` has {len(request.query)} rows and `prompts` {len(request.prompts)}.")
    users = [None] * len(request.query)
    if user_field is not None:
        extra = request.model_extra or {}
        values = request.labels if user_field == "labels" else extra.get(user_field)
        if values is not None:
            if not isinstance(values, list) or len(values) != len(request.query):
                raise _unprocessable(f"`{user_field}` (the user field) must be a list of one id per query.")
            users = values
    rows = []
    for row, (query, prompt) in enumerate(zip(request.query, request.prompts)):
        if not query.startswith(prompt):
            raise _unprocessable(f"query[{row}] does not start with prompts[{row}]: the response cannot be found.")
        _check_text(prompt, f"prompts[{row}]")
        _check_text(query[len(prompt) :], f"the response of query[{row}]")
        rows.append({"prompt": prompt, "completion": query[len(prompt) :], "user": users[row], "context": None})
    return rows


class RewardService:
    """The scoring and feedback logic behind the app; the model runs on one worker thread."""

    def __init__(self, reward: MiCRoReward, settings: ServeSettings):
        self.reward, self.settings = reward, settings
        self.metrics = ServeMetrics()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trl-micro-serve")
        self.batcher = DynamicBatcher(
            self.score_rows, self.executor, settings.max_batch_size, settings.max_wait_ms, self.metrics.observe_batch
        )
        self._warned_users: set[str] = set()
        self.recorder = None
        if settings.allow_feedback:
            model = reward.model
            feature_store = FeatureStore(model, settings.feature_dir) if settings.keep_features else None
            self.recorder = FeedbackRecorder(model, reward.user_store, feature_store)

    def score_rows(self, rows: list[dict]) -> list[dict]:
        users = [None if row["user"] is None else normalize_user_id(row["user"], "user") for row in rows]
        contexts = [row["context"] for row in rows]
        with torch.no_grad():
            scores = self.reward.score(
                [row["prompt"] for row in rows],
                [row["completion"] for row in rows],
                contexts=contexts if any(c is not None for c in contexts) else None,
                users=users if any(u is not None for u in users) else None,
            )
        self.metrics.rows.inc(len(rows))
        fallback = [
            user for user, routed in zip(users, scores["online_routed"].tolist()) if user is not None and not routed
        ]
        if fallback:
            self.metrics.fallback_rows.inc(len(fallback))
            new = sorted(set(fallback) - self._warned_users)
            if new:
                self._warned_users.update(new)
                logger.warning("Users the online router does not know, routed by the model's router: %s", new)
        return [
            {
                "reward": float(scores["rewards"][i]),
                "head_rewards": scores["head_rewards"][i].tolist(),
                "mixture_weights": scores["mixture_weights"][i].tolist(),
                "online_routed": bool(scores["online_routed"][i]),
            }
            for i in range(len(rows))
        ]

    def score_comparisons(self, comparisons: list[Comparison]) -> dict:
        """Per-head margins of each comparison (on the model's thread)."""
        contexts = [c.context for c in comparisons]
        return self.reward.comparison_margins(
            [c.prompt for c in comparisons],
            [c.chosen for c in comparisons],
            [c.rejected for c in comparisons],
            contexts=contexts if any(context is not None for context in contexts) else None,
        )

    def record_feedback(self, comparisons: list[Comparison], scored: dict) -> dict:
        """Record scored comparisons in the user store (on the store's thread); the answer once committed."""
        stored = [
            StoredComparison(
                normalize_user_id(c.user, "user"), c.prompt, c.chosen, c.rejected, c.context, c.comparison_id
            )
            for c in comparisons
        ]
        results = self.recorder.record(stored, scored)
        num_updates = {result.user_id: result.num_updates for result in results}
        self.metrics.feedback.inc(sum(not result.duplicate for result in results))
        return {
            "updated": sorted(num_updates),
            "comparisons": len(comparisons),
            "duplicates": sum(result.duplicate for result in results),
            "num_updates": dict(sorted(num_updates.items())),
        }

    def check_size(self, num_rows: int) -> None:
        if num_rows == 0:
            raise _unprocessable("The request has no rows.")
        if num_rows > self.settings.max_rows_per_request:
            raise HTTPException(
                status_code=413,
                detail=f"The request has {num_rows} rows; this server takes at most "
                f"{self.settings.max_rows_per_request} per request (--max_rows_per_request).",
            )


def create_app(reward: MiCRoReward, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving `reward` (see the module docstring)."""
    settings = settings or ServeSettings()
    if settings.allow_feedback and reward.user_store is None:
        raise ValueError(
            "Feedback is recorded in a user store: pass --user_store URL (e.g. sqlite:///users.db, created if missing)."
        )
    service = RewardService(reward, settings)

    @asynccontextmanager
    async def lifespan(_app):
        service.batcher.start()
        yield
        await service.batcher.stop()
        service.executor.shutdown(wait=False)
        if service.recorder is not None:
            service.recorder.close()

    app = FastAPI(title="trl-micro reward service", lifespan=lifespan)
    app.state.service = service

    async def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise HTTPException(status_code=401, detail="Missing or wrong bearer token (Authorization: Bearer ...).")

    @app.middleware("http")
    async def measure_and_limit(request: Request, call_next):
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if request.method == "POST" and length is not None and int(length) > settings.max_request_bytes:
            response = JSONResponse(
                status_code=413,
                content={
                    "detail": f"The request body has {length} bytes; this server takes at most "
                    f"{settings.max_request_bytes} (--max_request_bytes)."
                },
            )
        else:
            response = await call_next(request)
        service.metrics.observe_request(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    @app.post("/get_reward", dependencies=[Depends(authorized)])
    async def get_reward(request: OpenRLHFRequest):
        rows = openrlhf_rows(request, settings.user_field)
        service.check_size(len(rows))
        results = await service.batcher.submit(rows)
        rewards = [result["reward"] for result in results]
        num_heads = len(results[0]["head_rewards"])
        extra_logs = {f"head_reward_{k}": [result["head_rewards"][k] for result in results] for k in range(num_heads)}
        extra_logs["online_routed"] = [float(result["online_routed"]) for result in results]
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs}

    @app.post("/score", dependencies=[Depends(authorized)])
    async def score(request: ScoreRequest):
        service.check_size(len(request.rows))
        for index, row in enumerate(request.rows):
            _check_text(row.prompt, f"rows[{index}].prompt")
            _check_text(row.completion, f"rows[{index}].completion")
            if isinstance(row.prompt, str) != isinstance(row.completion, str):
                raise _unprocessable(f"rows[{index}]: prompt and completion must both be text or both be messages.")
        results = await service.batcher.submit([row.model_dump() for row in request.rows])
        answer = {"rewards": [r["reward"] for r in results], "online_routed": [r["online_routed"] for r in results]}
        if request.return_heads:
            answer["head_rewards"] = [r["head_rewards"] for r in results]
            answer["mixture_weights"] = [r["mixture_weights"] for r in results]
        return answer

    @app.post("/feedback", dependencies=[Depends(authorized)])
    async def feedback(request: FeedbackRequest):
        if not settings.allow_feedback:
            raise HTTPException(
                status_code=403, detail="Feedback is off on this server (start it with --allow_feedback)."
            )
        service.check_size(len(request.comparisons))
        for index, comparison in enumerate(request.comparisons):
            for name in ("prompt", "chosen", "rejected"):
                _check_text(getattr(comparison, name), f"comparisons[{index}].{name}")
        loop = asyncio.get_running_loop()
        scored = await loop.run_in_executor(service.executor, service.score_comparisons, request.comparisons)
        try:
            return await loop.run_in_executor(
                service.recorder.executor, service.record_feedback, request.comparisons, scored
            )
        except (OSError, RuntimeError, SQLAlchemyError) as error:
            logger.error("Feedback not recorded: %s", error)
            raise HTTPException(
                status_code=503,
                detail="The user store could not record the feedback; nothing was applied. Retry the request.",
                headers={"Retry-After": "1"},
            ) from error

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "num_heads": reward.model.num_heads,
            "feedback": settings.allow_feedback,
            "pid": os.getpid(),
        }

    @app.get("/metrics", dependencies=[Depends(authorized)])
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app
