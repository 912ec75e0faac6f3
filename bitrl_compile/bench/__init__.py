"""Measurement, the product's report: `bitrl-compile bench` (report.py, run in fresh processes by child.py) and
`bitrl-compile bench-kernels` (kernels.py). Research scripts under the repository's bench/ call these."""
