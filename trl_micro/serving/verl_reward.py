"""
MiCRo rewards for verl, as a custom reward function verl loads by path and name:

```yaml
reward:
  custom_reward_function:
    path: /path/to/site-packages/trl_micro/serving/verl_reward.py   # python -c "import trl_micro.serving.verl_reward as m; print(m.__file__)"
    name: compute_score            # verl's default (naive) reward manager: one response per call
    reward_kwargs:
      url: http://127.0.0.1:5000   # a `trl-micro serve` server; or model_name_or_path: micro-rm to score in process
      user_key: user_id            # extra_info[user_key] routes the row through the server's online router
      prompt_key: prompt           # extra_info[prompt_key] is the prompt (text or messages)
```

`compute_score_batch` is the same for verl's batch reward manager (lists in, a list of floats out). verl gives a
reward function the decoded response, the ground truth and the row's `extra_info`, not the prompt: put the prompt
(and the user id) in `extra_info` when preparing the dataset. A row whose `extra_info` has no prompt is an error naming
the key. With `url`, rows are scored by the server (`POST /score`; a refusal raises with the server's message); with
`model_name_or_path`, by a `MiCRoReward` loaded once per process (users routed through `online_router` /
`residual_heads` stores when given). Either way the rows meet the reward's one scoring core (`MiCRoReward.encode_rows`):
user ids follow its rule (a str or an int; `17.0` is refused, never read as "17.0"), texts its checks.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from functools import lru_cache
from typing import Any


def _rows(solution_strs: Sequence[str], extra_infos: Sequence[dict | None], user_key: str, prompt_key: str) -> list:
    from trl_micro.rewards import row_user_ids  # absolute: verl loads this file by path

    extra_infos = [extra or {} for extra in extra_infos]
    users = row_user_ids([extra.get(user_key) for extra in extra_infos], f"extra_info[{user_key!r}]")
    rows = []
    for index, (solution, extra) in enumerate(zip(solution_strs, extra_infos)):
        if extra.get(prompt_key) in (None, "", []):
            raise ValueError(
                f"Row {index}: extra_info has no {prompt_key!r} (the prompt). verl does not pass prompts to reward "
                f"functions: add the prompt to extra_info[{prompt_key!r}] when preparing the data, or set prompt_key."
            )
        prompt = extra[prompt_key]
        completion = solution if isinstance(prompt, str) else [{"role": "assistant", "content": solution}]
        rows.append({"prompt": prompt, "completion": completion, "user": users[index]})
    return rows


def _post(url: str, payload: dict, timeout: float, api_key: str | None) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url.rstrip("/") + "/score", data=json.dumps(payload).encode("utf-8"), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        detail = error.read().decode("utf-8", "replace")[:2000]
        raise RuntimeError(f"The trl-micro server at {url} answered {error.code}: {detail}") from error


@lru_cache(maxsize=1)  # a worker scores with one reward: a new one replaces it rather than joining it in memory
def _local_reward(model_name_or_path: str, online_router: str | None, residual_heads: str | None):
    from ..bundled.catalog import resolve_model_path
    from ..rewards import MiCRoReward

    return MiCRoReward.for_user_ids(
        resolve_model_path(model_name_or_path), online_router=online_router, residual_heads=residual_heads
    )


def compute_score_batch(
    data_sources: Sequence[Any],
    solution_strs: Sequence[str],
    ground_truths: Sequence[Any],
    extra_infos: Sequence[dict | None],
    url: str | None = None,
    model_name_or_path: str | None = None,
    online_router: str | None = None,
    residual_heads: str | None = None,
    user_key: str = "user_id",
    prompt_key: str = "prompt",
    timeout: float = 120.0,
    api_key: str | None = None,
    **_ignored,
) -> list[float]:
    """The routed MiCRo reward of each response (verl's batch reward manager signature; see the module docstring)."""
    if (url is None) == (model_name_or_path is None):
        raise ValueError("Give the verl MiCRo reward either `url` (a trl-micro server) or `model_name_or_path`.")
    rows = _rows(solution_strs, extra_infos, user_key, prompt_key)
    if url is not None:
        return [float(r) for r in _post(url, {"rows": rows}, timeout, api_key)["rewards"]]
    reward = _local_reward(model_name_or_path, online_router, residual_heads)
    users = [row["user"] for row in rows]
    scores = reward.score(
        [row["prompt"] for row in rows],
        [row["completion"] for row in rows],
        users=users if reward.user_column and any(u is not None for u in users) else None,
    )
    return scores["rewards"].tolist()


def compute_score(
    data_source: Any, solution_str: str, ground_truth: Any, extra_info: dict | None = None, **kwargs
) -> float:
    """The routed MiCRo reward of one response (verl's default reward manager signature)."""
    return compute_score_batch([data_source], [solution_str], [ground_truth], [extra_info], **kwargs)[0]
