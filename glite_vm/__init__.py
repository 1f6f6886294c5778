"""glite-vm: run every HTCondor job in its own short-lived virtual machine."""

from glite_vm.errors import Disposition, GliteVmError

__version__ = "0.1.0"
__all__ = ["Disposition", "GliteVmError", "__version__"]
