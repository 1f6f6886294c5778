"""glite-vm: run every HTCondor job in its own short-lived virtual machine."""

__version__ = "0.1.0"
