"""What every party shares: the study file and its feature spec, the model, and the `fedcare` CLI."""

__version__ = "0.1.0"
