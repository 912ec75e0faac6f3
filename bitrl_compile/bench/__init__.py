"""Measurement, the product's report: `bitrl-compile bench` (report.py, drawn by plots.py, written by markdown.py;
every measured process runs child.py) and `bitrl-compile bench-kernels` (kernels.py). machine.py holds the facts
about the machine (CPU name, load average, RSS) and builds the qemu instruction-count plugin. Research scripts
under the repository's bench/ call these; nothing here imports them."""
