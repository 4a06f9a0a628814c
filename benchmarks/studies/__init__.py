"""Studies: one question each about Stage 1 or Stage 2, answered on the comparison harness's pools."""
