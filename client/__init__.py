"""The site: its data ingestion and validation (CSV, Parquet, FHIR R4), the Flower ClientApp, local
DP-SGD training and evaluation. Patient-level data never leaves this package's process."""
