"""The coordinator's Flower ServerApp: the SecAgg+ workflow, round progress written to the run record."""
