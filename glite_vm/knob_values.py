"""The values of knobs that are more than a number: each type parses its own text and says
what to write instead when it cannot (snapshot retention, the pre-staging set, a rate, the
metrics address, a textfile path, a network name). :mod:`glite_vm.config` builds Settings of them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

from glite_vm.errors import RequestError
from glite_vm.units import _DURATION_UNITS, format_duration, format_size, parse_duration, parse_size


@dataclasses.dataclass(frozen=True)
class Retention:
    """How long kept snapshots stay (``GLITE_VM_SNAPSHOT_RETENTION``, docs/snapshots.md).

    ``max_age``: seconds after a job ended; ``max_bytes``: disk space of all VM directories
    together, oldest removed first. ``None``: no limit of that kind.
    """

    max_age: float | None = 7 * 86400.0
    max_bytes: int | None = None

    @classmethod
    def parse(cls, text: str) -> Retention:
        """``"7d"``, ``"50GB"``, ``"7d,50GB"``, ``"none"``. Durations end in s/m/h/d/w; sizes
        end in a byte unit (``500MB``, ``50GiB``), so ``30m`` is thirty minutes."""
        age: float | None = None
        size: int | None = None
        parts = [p for p in text.replace(",", " ").split() if p]
        if not parts or [p.lower() for p in parts] == ["none"]:
            return cls(None, None)
        for part in parts:
            low = part.lower()
            if low[-1:] in _DURATION_UNITS:
                if age is not None:
                    raise RequestError("snapshot retention", f"two ages in {text!r}")
                age = parse_duration(part, "snapshot retention")
            elif low.endswith("b"):
                if size is not None:
                    raise RequestError("snapshot retention", f"two sizes in {text!r}")
                size = parse_size(part, "snapshot retention")
            else:
                raise RequestError(
                    "snapshot retention",
                    f"{part!r} is neither an age (7d, 12h) nor a size (50GB); "
                    f"expected e.g. '7d,50GB' or 'none'",
                )
        return cls(age, size)

    def __str__(self) -> str:
        parts = []
        if self.max_age is not None:
            parts.append(format_duration(self.max_age))
        if self.max_bytes is not None:
            parts.append(format_size(self.max_bytes).replace(" ", "").replace(".0", ""))
        return ",".join(parts) or "none"


@dataclasses.dataclass(frozen=True)
class Prefetch:
    """The warm set an execute host's service keeps in its cache (``GLITE_VM_PREFETCH``,
    docs/images.md, "Pre-staging").

    Text: catalogue names and at most one ``top:N`` (the ``N`` catalogue images this host's
    jobs used most), separated by commas or blanks: ``"debian-12, sl6"``, ``"top:5"``,
    ``"debian-12 top:3"``; empty or ``"none"``: nothing. Whether a name is in the catalogue is
    the catalogue's to say (the service logs names it does not list).
    """

    names: tuple[str, ...] = ()
    top: int = 0

    @classmethod
    def parse(cls, text: str) -> Prefetch:
        items = [p for p in text.replace(",", " ").split() if p]
        if [i.lower() for i in items] in ([], ["none"]):
            return cls()
        names: list[str] = []
        top: int | None = None
        example = "write catalogue names and/or 'top:N', e.g. 'debian-12, sl6' or 'top:5'"
        for item in items:
            if item.lower().startswith("top:"):
                count = item[4:]
                if not count.isdigit() or int(count) < 1:
                    raise ValueError(
                        f"{item!r}: top:N needs a whole number N of at least 1 "
                        f"(the N most used images); {example}"
                    )
                if top is not None:
                    raise ValueError(f"top:N given twice ({text!r}); {example}")
                top = int(count)
            elif "/" in item or ":" in item or item.startswith(("-", ".")):
                raise ValueError(
                    f"{item!r} is not a catalogue name (pre-staging takes no URLs or paths: "
                    f"custom images are their owners'); {example}"
                )
            elif item not in names:
                names.append(item)
        return cls(tuple(names), top or 0)

    def __bool__(self) -> bool:
        return bool(self.names or self.top)

    def __str__(self) -> str:
        return " ".join([*self.names, *([f"top:{self.top}"] if self.top else [])]) or "none"


def parse_rate(text: str) -> int | None:
    """Bytes per second of ``GLITE_VM_PREFETCH_RATE``: a size per second (``20MB/s``,
    ``500KiB/s``); ``unlimited`` (or empty) for no cap."""
    value = text.strip()
    if value.lower() in ("", "unlimited", "none"):
        return None
    size, slash, per = value.replace(" ", "").rpartition("/")
    if not slash or per.lower() not in ("s", "sec"):
        raise ValueError(
            f"{value!r} is not a rate; write a size per second, e.g. '20MB/s' or '500KiB/s', "
            "or 'unlimited'"
        )
    rate = parse_size(size, "rate")
    if rate < 1024:
        raise ValueError(f"{value!r} is below 1KiB/s; write e.g. '20MB/s', or 'unlimited'")
    return rate


#: Names of a VM network: ``none``, ``user`` (QEMU's user-mode NAT) or a libvirt network.
NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_network_name(name: str, field: str = "network") -> str:
    if not isinstance(name, str) or not NETWORK_NAME.match(name):
        raise RequestError(
            field,
            f"{name!r} is not a network name ('none', 'user' or a libvirt network: letters, "
            "digits, '.', '_', '-')",
        )
    return name


@dataclasses.dataclass(frozen=True)
class MetricsAddress:
    """Where the service serves its Prometheus metrics (``GLITE_VM_METRICS_ADDRESS``): a literal
    IP address and a port, ``127.0.0.1:9464`` or ``[::1]:9464``. A host name is refused: what
    is bound must be what the admin reads, not what a resolver says today."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.host).is_loopback

    @classmethod
    def parse(cls, text: str) -> MetricsAddress | None:
        """``"127.0.0.1:9464"``, ``"[::1]:9464"``; empty or ``"off"``: no endpoint."""
        value = text.strip()
        if value.lower() in ("", "off", "none"):
            return None
        example = "write e.g. '127.0.0.1:9464' or '[::1]:9464'"
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{value!r} is not an address and port; {example}")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"{value!r}: put an IPv6 address in brackets; {example}")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{host!r} is not an IP address (host names are not taken); {example}"
            ) from None
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"{port_text!r} is not a port (1-65535); {example}")
        return cls(str(address), int(port_text))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_textfile(text: str) -> Path | None:
    """A node_exporter textfile: an absolute path ending in ``.prom`` (the collector reads no
    other name), or empty for none."""
    value = text.strip()
    if not value:
        return None
    path = Path(value)
    if not path.is_absolute() or path.suffix != ".prom" or path.name.startswith("."):
        raise ValueError(
            f"{value!r} is not an absolute path of a file ending in .prom (node_exporter's "
            "textfile collector reads only those), e.g. "
            "'/var/lib/prometheus/node-exporter/glite-vm.prom'"
        )
    return path


__all__ = [
    "NETWORK_NAME",
    "MetricsAddress",
    "Prefetch",
    "Retention",
    "check_network_name",
    "parse_rate",
    "parse_textfile",
]
