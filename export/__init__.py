"""Global model -> single-file ONNX (fp32) -> calibrated static-QDQ int8 ONNX. Never imports Flower."""
