"""``STABLESEG_ALLOWED_HOSTS``: the hosts, IP addresses and CIDR networks image URLs may reach
besides public addresses (see :mod:`ml_backend.fetch`), as normalised entries.

Its own module so that the settings (which validate the variable) and the fetcher (which applies
it) both import it without importing each other.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

_HOST_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_-]+)*$")


def parse_allowed_hosts(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``STABLESEG_ALLOWED_HOSTS`` as normalised entries: host names, IP addresses, CIDRs.

    Accepts a comma-separated string or a sequence of entries. Raises:
        ValueError: an entry that is none of those, naming it and the expected forms.
    """
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    entries: list[str] = []
    for item in items:
        entry = str(item).strip().lower().rstrip(".")
        if not entry:
            continue
        try:
            entries.append(str(ipaddress.ip_network(entry, strict=False)))
            continue
        except ValueError:
            pass
        if not _HOST_NAME.match(entry):
            raise ValueError(
                f"STABLESEG_ALLOWED_HOSTS entry {str(item).strip()!r} is not a host name, IP "
                "address or CIDR network; give e.g. '10.0.0.0/8,images.local' (no scheme, port "
                "or path)"
            )
        entries.append(entry)
    return tuple(entries)
