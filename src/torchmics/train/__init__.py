"""Training: the loop, its data, and the launcher that starts one process per rank."""
