"""The feature cache: HDF5 shards of each layer, their manifest, checksums, locks and dtypes."""
