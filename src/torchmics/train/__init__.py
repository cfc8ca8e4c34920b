"""Training: the loop, its data, and the configuration and reporting around them."""
