"""`python -m bitrl_compile.cli ...` = `bitrl-compile ...`."""

from bitrl_compile.cli import main

main()
