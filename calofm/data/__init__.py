"""Shower data: HDF5 formats, the synthetic stand-in generator, preprocessing and the multi-detector loader."""
