"""The hospital node: site data ingestion and validation, the Flower ClientApp, local DP-SGD
training and evaluation. Patient-level data never leaves this package's process."""
