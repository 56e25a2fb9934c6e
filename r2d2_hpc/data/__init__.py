"""Data stage: NIfTI sources -> preprocessing -> HDF5 shards -> PyTorch datasets."""
