"""Find images (class folders, tar shards), labels and splits; decode and preprocess them safely."""
