"""fedmpi plug-in: FedAvg with top-k sparsified uploads and error feedback (``method``), a linear
model and a CSV data set reader (``extras``)."""
