"""Statistics a compression method reads from the model: calibration text (``calib``) and the
Kronecker-factored curvature of the middle linears (``kfac``)."""
