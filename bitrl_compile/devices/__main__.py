"""`python -m bitrl_compile.devices setup [--tvm] | python ARGS | rpc-server ...` (see devices.main)."""

import sys

from bitrl_compile.devices import main

sys.exit(main())
