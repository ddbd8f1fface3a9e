"""The coordinator: the Flower ServerApp, its SecAgg+ workflow, checkpoints and round progress."""
