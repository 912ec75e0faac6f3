"""`python -m bitrl_compile.cli ...` = `bitrl-compile ...` (and says so in its messages)."""

from bitrl_compile.cli import main

main(prog_name="bitrl-compile")
