"""The on-site prediction service over a verified model package (ONNX Runtime). Never imports Flower."""
