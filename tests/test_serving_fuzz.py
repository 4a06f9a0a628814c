"""
schemathesis against the reward server's own OpenAPI schema (`app.openapi()`, which the server itself does not serve
by default): every operation, with the token and without it, bodies that fit the schema and bodies that do not, a
bounded number of examples each (derandomized: the same examples every run). No answer may be a 5xx, and every
answer's status, content type and body must be what the schema documents. The server runs on 127.0.0.1 and is
stopped by the test.
"""

import importlib.util

import pytest

from trl_micro.scripts.serve import build_app

from .conftest import skip_unless_strict
from .rl_fixtures import reward_checkpoint  # noqa: F401 (fixture)
from .serving_fixtures import guarded_server_arguments
from .test_serving import serving

TOKEN = "fuzz-token"
# (generation mode: bodies that fit the schema or not, with the token, examples per operation)
RUNS = [("positive", True, 25), ("negative", True, 15), ("positive", False, 5)]


@pytest.fixture(scope="module")
def fuzzed(reward_checkpoint, tmp_path_factory):  # noqa: F811
    if importlib.util.find_spec("schemathesis") is None:
        skip_unless_strict("schemathesis is not installed (the dev extra has it)")
    folder = tmp_path_factory.mktemp("fuzzed")
    limits = dict(max_rows_per_request=16, max_request_bytes=2**18, max_wait_ms=0)
    app = build_app(guarded_server_arguments(reward_checkpoint, folder, TOKEN, **limits))
    with serving(app) as url:
        yield app, url


def fuzz(operation, url: str, mode: str, headers: dict, examples: int, statuses: set) -> None:
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        response = case.call(base_url=url, headers=headers, timeout=60)
        statuses.add((operation.path, response.status_code))
        case.validate_response(response, checks=checks)

    run()


def test_fuzzed_requests_get_no_5xx_and_the_answers_the_schema_documents(fuzzed):
    import schemathesis

    app, url = fuzzed
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} == {
        "/get_reward",
        "/score",
        "/rerank",
        "/feedback",
        "/health",
        "/metrics",
    }
    statuses = set()
    for operation in operations:
        for mode, with_token, examples in RUNS:
            if mode == "negative" and not operation.body:
                continue  # a GET without parameters has no invalid form
            headers = {"Authorization": f"Bearer {TOKEN}"} if with_token else {}
            fuzz(operation, url, mode, headers, examples, statuses)
    for operation in operations:  # the fuzzing reached every endpoint's work, not only its refusals
        assert (operation.path, 200) in statuses and (operation.path, 401) in statuses or operation.path == "/health"
    assert {status for _, status in statuses} >= {200, 401, 422}, sorted(statuses)
