"""`glite-vm` command line: a thin shell over the library (:mod:`glite_vm.cli.main`)."""
