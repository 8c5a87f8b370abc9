"""featx: pretrained CNN layer features, cached in HDF5 shards, compared with a linear SVM."""

__version__ = "0.1.0"
