"""The `trl-micro` command (`cli.py`) and its scripts, as TRL keeps its own in `trl/scripts`; `recipes/` runs the same."""
