"""
The reward service: a FastAPI app over one [`MiCRoReward`], its endpoints, its limits and its refusals.

- `POST /get_reward`: OpenRLHF's remote reward protocol. `{"query": [...], "prompts": [...], "labels": [...]}`,
  each query the prompt followed by the response in one text; answered `{"rewards", "scores", "extra_logs"}` with the
  per-head rewards in `extra_logs`. The user of each row is the request field `ServeSettings.user_field` names (e.g.
  `labels`, when the dataset's label column carries a user id); without one, rows are routed by the prompt.
- `POST /score`: rows of `prompt`, `completion` (text or messages), optional `user` and `context`; answered with the
  routed rewards and, with `"return_heads": true`, the per-head rewards and mixture weights.
- `POST /rerank`: lines of `prompt`, `candidates` and optional `users` and `context`; answered with each user's pick
  among the line's candidates and every candidate's score for that user (`MiCRoReward.rerank`: each candidate read by
  the backbone once, however many users rank it), scored on the model's thread in one call of its own.
- `POST /feedback` (only with `allow_feedback`): comparisons `(user, prompt, chosen, rejected[, context,
  comparison_id])` update that user's online routing in the user store (`trl_micro.personalization.stores`) and are
  logged there, in one transaction committed before the answer, on a thread of its own (`serving.feedback`): scoring
  never waits for a commit, a failed write changes nothing, and a comparison whose `comparison_id` is already logged
  is not applied again (its answer is repeated). Replicas on one store see each other's comparisons within the
  store's staleness bound (`--store_staleness_s`).
- `GET /health` (no token needed; 503 while the batcher's worker is down), `GET /metrics` (Prometheus text).
- `GET /openapi.json` and `/docs` only with `serve_openapi`, behind the token like every other endpoint.

Rows are checked, cut and tokenized by the reward's one scoring core (`MiCRoReward.encode_rows`) on the model's thread
before they join a batch: a request with a row it refuses gets a 422 naming the row (`rows[3].completion ...`) and
never reaches another client's batch. Request bodies are typed strictly (user ids are a JSON string or integer, flags
booleans); every answer is JSON, 4xx naming the field and the fix; none echoes its input. Limits (`ServeSettings`, each
a `trl-micro serve` flag): body bytes counted as they arrive, rows per request, rows admitted at once (503 and
`Retry-After` past it), concurrent requests, a deadline per request (503), and body and header read timeouts
(`serving.guards`). A request whose client hung up is dropped before it is scored. A user the online router does not
know is routed by the model's router and counted (`trl_micro_fallback_rows_total`), never an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..feature_cache import FeatureStore
from ..personalization.stores import Comparison as StoredComparison
from ..reranking import check_rerank_inputs
from ..reward_inputs import InvalidRow, check_unicode, row_user_ids
from ..rewards import EncodedRow, MiCRoReward
from .batcher import DynamicBatcher
from .feedback import FeedbackRecorder
from .guards import BearerAuth, BodyLimits, ConcurrencyLimit, RequestMetrics, header_timeout_protocol
from .metrics import ServeMetrics
from .model_worker import ModelWorker
from .schemas import (
    FEEDBACK_FIELDS,
    POST_ERRORS,
    SCORE_FIELDS,
    Comparison,
    FeedbackAnswer,
    FeedbackRequest,
    GetRewardAnswer,
    HealthAnswer,
    OpenRLHFRequest,
    RerankAnswer,
    RerankLine,
    RerankRequest,
    ScoreAnswer,
    ScoreRequest,
    error_answers,
    rerank_fields,
)

logger = logging.getLogger(__name__)

MAX_ERRORS_LISTED = 20
COUNT_LIMITS = (
    "max_batch_size",
    "max_rows_per_request",
    "max_request_bytes",
    "max_queued_rows",
    "max_concurrent_requests",
    "max_connections",
)


@dataclass
class ServeSettings:
    """What the service accepts; see `trl_micro.scripts.serve.ServeArguments` for each field's meaning and flag."""

    user_field: str | None = None
    allow_feedback: bool = False
    keep_features: bool = True
    feature_dir: str | None = None
    api_key: str | None = None
    serve_openapi: bool = False
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_rows_per_request: int = 1024
    max_request_bytes: int = 16 * 2**20
    max_queued_rows: int = 4096
    max_concurrent_requests: int = 64
    max_connections: int = 256
    request_timeout_s: float = 60.0
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0

    def check(self) -> None:
        """Refuse settings that would turn a limit off or make it unreachable, naming the flag."""
        for name in COUNT_LIMITS:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {getattr(self, name)!r}.")
        for name in ("request_timeout_s", "body_timeout_s", "header_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be a number of seconds > 0, got {getattr(self, name)!r}.")
        if self.max_rows_per_request > self.max_queued_rows:
            raise ValueError(
                f"--max_rows_per_request ({self.max_rows_per_request}) is above --max_queued_rows "
                f"({self.max_queued_rows}): the largest request could never be admitted."
            )
        if self.api_key is not None:
            check_api_key(self.api_key, "--api_key")


def check_api_key(api_key: str, source: str) -> None:
    """An API key must be a visible ASCII token: an empty one would look like authentication and be none."""
    if not api_key.strip():
        raise ValueError(
            f"{source} is empty: authentication would be off. Give a token (e.g. `openssl rand -hex 32`), or unset "
            "it to serve without one on 127.0.0.1."
        )
    if not all(33 <= ord(character) <= 126 for character in api_key):
        raise ValueError(f"{source} must be visible ASCII characters without spaces (it travels in an HTTP header).")


def openrlhf_fields(user_field: str | None) -> dict[str, str]:
    return {
        "prompts": "prompts[{row}]",
        "completions": "the response of query[{row}]",
        "users": f"{user_field}[{{row}}]",
    }


def unprocessable(message: str) -> HTTPException:
    return HTTPException(status_code=422, detail=message)


def store_unavailable(what_happened: str) -> HTTPException:
    """The 503 of a user store that failed (`"The user store <what_happened>. Retry the request."`)."""
    return HTTPException(
        status_code=503,
        detail=f"The user store {what_happened}. Retry the request.",
        headers={"Retry-After": "1"},
    )


def invalid_row(error: InvalidRow, fields: dict[str, str]) -> HTTPException:
    """The 422 of a row the scoring core refused, located in the request (`rows[3].completion is empty: ...`)."""
    where = fields.get(error.name, error.name + "[{row}]").replace("{row}", str(error.row))
    return unprocessable(f"{where} {error.problem}")


def openrlhf_rows(request: OpenRLHFRequest, user_field: str | None) -> tuple[list[str], list[str], list | None]:
    """Prompts, responses and users of an OpenRLHF request: each query split into its prompt and the response."""
    if request.prompts is None:
        raise unprocessable("`prompts` is missing: each query is split into the prompt and the response after it.")
    if len(request.prompts) != len(request.query):
        raise unprocessable(f"`query` has {len(request.query)} rows and `prompts` {len(request.prompts)}.")
    users = None
    if user_field is not None:
        values = request.labels if user_field == "labels" else (request.model_extra or {}).get(user_field)
        if values is not None:
            if not isinstance(values, list) or len(values) != len(request.query):
                raise unprocessable(f"`{user_field}` (the user field) must be a list of one id per query.")
            users = values
    for row, (query, prompt) in enumerate(zip(request.query, request.prompts)):
        if not query.startswith(prompt):
            raise unprocessable(f"query[{row}] does not start with prompts[{row}]: the response cannot be found.")
    responses = [query[len(prompt) :] for query, prompt in zip(request.query, request.prompts)]
    return list(request.prompts), responses, users


async def client_gone(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client has closed the connection (the body already read, only a disconnect can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# ------------------------------------------------------------------------------------------------------ service
class RewardService:
    """The scoring and feedback logic behind the app; the model runs on one worker thread."""

    def __init__(self, reward: MiCRoReward, settings: ServeSettings):
        self.reward, self.settings = reward, settings
        self.metrics = ServeMetrics()
        self.executor = ModelWorker("trl-micro-serve")  # scoring before feedback's scoring
        self.batcher = DynamicBatcher(
            self.score_rows, self.executor, settings.max_batch_size, settings.max_wait_ms, self.metrics.observe_batch
        )
        self.admitted_rows = 0
        self.recorder = None
        if settings.allow_feedback:
            model = reward.model
            feature_store = FeatureStore(model, settings.feature_dir) if settings.keep_features else None
            self.recorder = FeedbackRecorder(model, reward.user_store, feature_store)

    def score_rows(self, rows: list[EncodedRow]) -> list[dict]:
        """Score encoded rows of one or several requests (on the model's thread)."""
        scores = self.reward.score_encoded(rows)
        self.metrics.rows.inc(len(rows))
        routed = scores["online_routed"].tolist()
        self.metrics.fallback_rows.inc(sum(row.user is not None and not known for row, known in zip(rows, routed)))
        return [
            {
                "reward": float(scores["rewards"][i]),
                "head_rewards": scores["head_rewards"][i].tolist(),
                "mixture_weights": scores["mixture_weights"][i].tolist(),
                "online_routed": bool(routed[i]),
            }
            for i in range(len(rows))
        ]

    def check_size(self, num_rows: int) -> None:
        if num_rows == 0:
            raise unprocessable("The request has no rows.")
        if num_rows > self.settings.max_rows_per_request:
            raise HTTPException(
                status_code=413,
                detail=f"The request has {num_rows} rows; this server takes at most "
                f"{self.settings.max_rows_per_request} per request (--max_rows_per_request).",
            )

    @contextmanager
    def admit(self, num_rows: int):
        """Hold `num_rows` of the `max_queued_rows` the model's thread may owe answers for; past it, 503."""
        if self.admitted_rows + num_rows > self.settings.max_queued_rows:
            self.metrics.overloaded.inc()
            raise HTTPException(
                status_code=503,
                detail=f"{self.admitted_rows} rows are waiting to be scored, the most this server holds "
                f"(--max_queued_rows {self.settings.max_queued_rows}); retry after the Retry-After seconds.",
                headers={"Retry-After": "1"},
            )
        self.admitted_rows += num_rows
        self.metrics.admitted_rows.set(self.admitted_rows)
        try:
            yield
        finally:
            self.admitted_rows -= num_rows
            self.metrics.admitted_rows.set(self.admitted_rows)

    async def answer(self, request: Request, num_rows: int, work: Callable[[], Awaitable], fields: dict[str, str]):
        """
        `await work()` for a request of `num_rows` rows under the server's limits: admitted within `max_queued_rows`,
        abandoned (and its rows dropped before scoring) when the client hangs up (499) or `request_timeout_s` passes
        (503); a row the scoring core refuses is a 422 located by `fields`, a failing user store a 503.
        """
        with self.admit(num_rows):
            task = asyncio.ensure_future(work())
            gone = asyncio.ensure_future(client_gone(request.receive))
            try:
                done, _ = await asyncio.wait(
                    {task, gone}, timeout=self.settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                gone.cancel()
                task.cancel()  # no effect once done; else its rows are dropped before they are scored
            if task in done:
                try:
                    return task.result()
                except InvalidRow as error:
                    raise invalid_row(error, fields) from None
                except (OSError, SQLAlchemyError) as error:
                    logger.error("The user store could not be read: %s", error)
                    raise store_unavailable("could not be read; nothing was scored") from error
        reason = "client_gone" if gone in done else "timed_out"
        self.metrics.dropped_rows.labels(reason=reason).inc(num_rows)
        if gone in done:
            raise HTTPException(status_code=499, detail="The client closed the connection; the request was dropped.")
        raise HTTPException(
            status_code=503,
            detail=f"Not answered within {self.settings.request_timeout_s:g} s (--request_timeout_s): the server is "
            "busy. Retry after the Retry-After seconds.",
            headers={"Retry-After": "1"},
        )

    async def on_model_thread(self, function: Callable, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.executor, partial(function, *args, **kwargs))

    async def in_model_background(self, function: Callable, *args, **kwargs):
        """`function` on the model's thread once no scoring call waits (`ModelWorker.submit_background`)."""
        return await asyncio.wrap_future(self.executor.submit_background(function, *args, **kwargs))

    async def score(self, request: Request, prompts, completions, contexts, users, fields: dict[str, str]) -> list:
        """Rows checked and encoded by the scoring core on the model's thread, then scored in a dynamic batch."""

        async def work():
            encoded = await self.on_model_thread(
                self.reward.encode_rows, prompts, completions, contexts=contexts, users=users, allow_empty=False
            )
            return await self.batcher.submit(encoded)

        return await self.answer(request, len(prompts), work, fields)

    async def rerank(self, request: Request, lines: list[RerankLine]) -> dict:
        """Each line's best candidate for each of its users (`MiCRoReward.rerank`, one backbone pass per candidate),
        on the model's thread at scoring's priority, within the limits a request of that many candidates has."""
        num_candidates = sum(len(line.candidates) for line in lines)
        self.check_size(num_candidates)
        self.check_size(sum(len(line.users or [None]) for line in lines))
        prompts, candidates = [line.prompt for line in lines], [line.candidates for line in lines]
        users = [line.users or [None] for line in lines]
        contexts = [line.context for line in lines]
        try:
            check_rerank_inputs(prompts, candidates, users, contexts)
        except InvalidRow as error:
            raise invalid_row(error, rerank_fields(len(lines))) from None
        except (TypeError, ValueError) as error:
            raise unprocessable(str(error)) from None
        work = partial(self.on_model_thread, self.reward.rerank, prompts, candidates, users=users, contexts=contexts)
        reranking = await self.answer(request, num_candidates, work, rerank_fields(len(lines)))
        self.metrics.rows.inc(num_candidates)
        picks = [{**record, "line": record.pop("prompt_index")} for record in reranking.to_records()]
        return {"picks": picks}

    async def feedback(self, request: Request, comparisons: list[Comparison]) -> dict:
        """Score comparisons (within the request's limits), then record them in the user store (to the end: a
        comparison handed to the store is committed or refused whatever the client does)."""
        try:
            users = row_user_ids([c.user for c in comparisons], "users")
            first_of = {}
            for row, comparison in enumerate(comparisons):
                if comparison.comparison_id is None:
                    continue
                check_unicode(comparison.comparison_id, "comparison_ids", row)
                first = first_of.setdefault(comparison.comparison_id, row)
                if first != row:
                    raise InvalidRow(
                        "comparison_ids", row, f"repeats comparisons[{first}].comparison_id: give each its own id."
                    )
        except InvalidRow as error:
            raise invalid_row(error, FEEDBACK_FIELDS) from None
        scored = await self.answer(
            request,
            2 * len(comparisons),
            partial(
                self.in_model_background,
                self.reward.comparison_margins,
                [c.prompt for c in comparisons],
                [c.chosen for c in comparisons],
                [c.rejected for c in comparisons],
                contexts=[c.context for c in comparisons],
                allow_empty=False,
            ),
            FEEDBACK_FIELDS,
        )
        stored = [
            StoredComparison(user, c.prompt, c.chosen, c.rejected, c.context, c.comparison_id)
            for user, c in zip(users, comparisons)
        ]
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(self.recorder.executor, self.recorder.record, stored, scored)
        except (OSError, RuntimeError, SQLAlchemyError) as error:
            logger.error("Feedback not recorded: %s", error)
            raise store_unavailable("could not record the feedback; nothing was applied") from error
        num_updates = {result.user_id: result.num_updates for result in results}
        self.metrics.feedback.inc(sum(not result.duplicate for result in results))
        return {
            "updated": sorted(num_updates),
            "comparisons": len(comparisons),
            "duplicates": sum(result.duplicate for result in results),
            "num_updates": dict(sorted(num_updates.items())),
        }


# ----------------------------------------------------------------------------------------------------- the app
def validation_error_answer(_request: Request, error: RequestValidationError) -> JSONResponse:
    """422 for a body that does not parse or fit the request model: where and what, never the input itself (which
    may be huge, or a NaN that JSON cannot carry)."""
    items = []
    for issue in error.errors()[:MAX_ERRORS_LISTED]:
        message = str(issue.get("msg", "invalid"))
        if issue.get("type") == "json_invalid" and isinstance(issue.get("ctx"), dict):
            message = f"{message}: {issue['ctx'].get('error', '')}"
        items.append(
            {
                "loc": [part if isinstance(part, int) else str(part) for part in issue.get("loc", ())],
                "msg": message.encode("utf-8", "replace").decode("utf-8"),
                "type": str(issue.get("type", "value_error")),
            }
        )
    return JSONResponse(status_code=422, content={"detail": items})


def create_app(reward: MiCRoReward, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving `reward` (see the module docstring); serve it with `server_config(app, ...)`."""
    settings = settings or ServeSettings()
    settings.check()
    if settings.allow_feedback and reward.user_store is None:
        raise ValueError(
            "Feedback is recorded in a user store: pass --user_store URL (e.g. sqlite:///users.db, created if missing)."
        )
    if reward.max_chars is None:
        logger.warning("The reward has no max_length or max_chars: texts are not bounded in characters.")
    service = RewardService(reward, settings)

    @asynccontextmanager
    async def lifespan(_app):
        service.batcher.start()
        yield
        await service.batcher.stop()
        service.executor.shutdown(wait=False)
        if service.recorder is not None:
            service.recorder.close()

    app = FastAPI(
        title="trl-micro reward service",
        lifespan=lifespan,
        openapi_url="/openapi.json" if settings.serve_openapi else None,
        docs_url="/docs" if settings.serve_openapi else None,
        redoc_url=None,
    )
    app.state.service = service
    # Added innermost first: a request meets RequestMetrics, then BearerAuth, ConcurrencyLimit, BodyLimits.
    app.add_middleware(BodyLimits, max_bytes=settings.max_request_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(ConcurrencyLimit, max_concurrent=settings.max_concurrent_requests)
    if settings.api_key is not None:
        app.add_middleware(BearerAuth, api_key=settings.api_key)
    app.add_middleware(RequestMetrics, metrics=service.metrics, routes=app.router.routes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return validation_error_answer(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, error: StarletteHTTPException):
        return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, error: Exception):
        return JSONResponse({"detail": "Internal server error; the server's log has the details."}, status_code=500)

    @app.post("/get_reward", response_model=GetRewardAnswer, responses=error_answers(*POST_ERRORS))
    async def get_reward(body: OpenRLHFRequest, request: Request):
        prompts, responses, users = openrlhf_rows(body, settings.user_field)
        service.check_size(len(prompts))
        results = await service.score(request, prompts, responses, None, users, openrlhf_fields(settings.user_field))
        rewards = [result["reward"] for result in results]
        num_heads = len(results[0]["head_rewards"])
        extra_logs = {f"head_reward_{k}": [result["head_rewards"][k] for result in results] for k in range(num_heads)}
        extra_logs["online_routed"] = [float(result["online_routed"]) for result in results]
        return {"rewards": rewards, "scores": rewards, "extra_logs": extra_logs}

    @app.post(
        "/score",
        response_model=ScoreAnswer,
        response_model_exclude_none=True,
        responses=error_answers(*POST_ERRORS),
    )
    async def score(body: ScoreRequest, request: Request):
        rows = body.rows
        service.check_size(len(rows))
        results = await service.score(
            request,
            [row.prompt for row in rows],
            [row.completion for row in rows],
            [row.context for row in rows],
            [row.user for row in rows],
            SCORE_FIELDS,
        )
        answer = {"rewards": [r["reward"] for r in results], "online_routed": [r["online_routed"] for r in results]}
        if body.return_heads:
            answer["head_rewards"] = [r["head_rewards"] for r in results]
            answer["mixture_weights"] = [r["mixture_weights"] for r in results]
        return answer

    @app.post("/rerank", response_model=RerankAnswer, responses=error_answers(*POST_ERRORS))
    async def rerank(body: RerankRequest, request: Request):
        return await service.rerank(request, body.lines)

    @app.post("/feedback", response_model=FeedbackAnswer, responses=error_answers(403, *POST_ERRORS))
    async def feedback(body: FeedbackRequest, request: Request):
        if not settings.allow_feedback:
            raise HTTPException(
                status_code=403, detail="Feedback is off on this server (start it with --allow_feedback)."
            )
        service.check_size(len(body.comparisons))
        return await service.feedback(request, body.comparisons)

    @app.get(
        "/health",
        response_model=HealthAnswer,
        response_model_exclude_none=True,
        responses={503: {"model": HealthAnswer, "description": "The batcher's worker is down."}},
    )
    async def health():
        answer = {"status": "ok", "num_heads": reward.model.num_heads, "feedback": settings.allow_feedback}
        if not service.batcher.running:
            answer.update(status="unavailable", reason="The batcher's worker is not running.")
            return JSONResponse(answer, status_code=503)
        return answer

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={  # FastAPI would document a model in the route's media type (text): the error is JSON
            401: {
                "description": error_answers(401)[401]["description"],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorAnswer"}}},
            }
        },
    )
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 5000, log_level: str = "info", **kwargs):
    """The `uvicorn.Config` serving `app` with its settings' connection limits: the header timeout, the connection
    cap (`max_connections`, uvicorn's own plain-text 503 past it), no WebSocket upgrades."""
    import uvicorn

    settings: ServeSettings = app.state.service.settings
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=header_timeout_protocol(settings.header_timeout_s),
        ws="none",
        limit_concurrency=settings.max_connections,
        **kwargs,
    )
