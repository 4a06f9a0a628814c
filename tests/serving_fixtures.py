"""What the reward-server tests share: the arguments of a server with a token, feedback and a user store."""

from pathlib import Path

from trl_micro.scripts.serve import ServeArguments


def guarded_server_arguments(checkpoint: str, folder: Path, token: str, **limits) -> ServeArguments:
    """`trl-micro serve` on `checkpoint` with the API key `token`, a SQLite user store and a feature store in
    `folder`, feedback allowed, users named in each row's `labels`, and the request `limits` given."""
    return ServeArguments(
        model_name_or_path=checkpoint,
        user_store=f"sqlite:///{folder / 'users.db'}",
        feature_dir=str(folder / "features"),
        allow_feedback=True,
        user_field="labels",
        api_key=token,
        **limits,
    )
