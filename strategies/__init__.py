"""How an aggregated (secure) sum becomes the next global model: strategies over model deltas."""
