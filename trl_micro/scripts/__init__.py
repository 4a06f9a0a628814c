"""The `trl-micro` command and the code behind the recipes (`recipes/`), as TRL keeps its own in `trl/scripts`."""
