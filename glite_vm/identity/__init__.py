"""Guest identity: the VM's hostname, its X.509 host certificate and the CAs it trusts.

Host-side and pure where it can be: :func:`prepare_guest_identity` turns settings and the job's
facts into a :class:`GuestSetup` (files, directories, commands) that the VM layer applies through
the guest agent before the payload starts. Private keys travel as :class:`Secret` and never show
in a ``repr``, a log line or an error message. See docs/identity.md.
"""
