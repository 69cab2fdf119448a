"""Training SHARCS: the hardness-label state and the train loop."""
