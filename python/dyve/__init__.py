"""DyVE-Caffe: dynamic variable-effort inference (DyVEDeep, arXiv 1704.01137) in Caffe."""
