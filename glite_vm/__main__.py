"""``python -m glite_vm``: the same as the ``glite-vm`` command."""

import sys

from glite_vm.cli.main import main

sys.exit(main())
