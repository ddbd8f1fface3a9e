"""fedcare tests: real Flower simulation, real Opacus, real ONNX Runtime; no fakes."""
