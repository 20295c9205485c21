"""fedmpi: an MPI-native benchmarking suite for communication- and compute-efficient FL."""
__version__ = "0.1.0"
