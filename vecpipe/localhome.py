"""Where ``vecpipe services up`` left its services: the home folder and its ``services.json``.

The CLI takes its addresses from there when nothing else gives them (see
:func:`local_defaults`); a checkout's `make demo` keeps its services in the checkout's
``.vecpipe`` folder.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from vecpipe.redact import redact_url

__all__ = ["DEFAULT_HOME", "LOCAL_HOME", "SERVICES_FILE", "find_local_home", "local_defaults",
           "recorded_services"]

# `vecpipe services up` records in <home>/services.json where its Kafka and PostgreSQL listen
# (vecpipe.devservices writes it); the CLI takes its addresses from there when nothing else gives
# them. A checkout's `make demo` keeps its services in the checkout's .vecpipe folder.
SERVICES_FILE = "services.json"
LOCAL_HOME = ".vecpipe"
DEFAULT_HOME = str(Path.home() / ".local" / "share" / "vecpipe")



def find_local_home(start: Path) -> Path | None:
    """The nearest ``.vecpipe`` folder, in ``start`` or a folder above (a checkout's home)."""
    for folder in (start, *start.parents):
        if (folder / LOCAL_HOME).is_dir():
            return folder / LOCAL_HOME
    return None


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return False
    return True


def recorded_services(home: Path) -> dict[str, dict[str, str]]:
    """kafka.bootstrap and database.url as ``vecpipe services up`` recorded them in ``home``,
    while both services it started still run; empty otherwise (no readable services.json, or
    services stopped: their ports may be another home's by now)."""
    try:
        document = json.loads((home.expanduser() / SERVICES_FILE).read_text(encoding="utf-8"))
        bootstrap, url = document["bootstrap"], document["database_url"]
        pids = (document["kafka"]["pid"], document["postgres"]["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not (isinstance(bootstrap, str) and isinstance(url, str)) or not all(map(_alive, pids)):
        return {}
    return {"kafka": {"bootstrap": bootstrap}, "database": {"url": url}}


def local_defaults(layered: dict[str, dict[str, Any]]) -> None:
    """Fill the home and, when nothing gave either address, both addresses from the local
    services' record. Never one of the two (a production broker with a laptop's database), and
    never for a client configured for a secured cluster; a line on stderr says when it is used."""
    home = layered["ops"].get("home")
    if home is None:
        try:
            found = find_local_home(Path.cwd())
        except OSError:  # the working directory was removed
            found = None
        if found is not None:
            layered["ops"]["home"] = home = str(found)
    client = layered["kafka"].get("client") or {}
    secured = any(k == "security.protocol" or k.startswith("sasl.") for k in client)
    if "bootstrap" in layered["kafka"] or "url" in layered["database"] or secured:
        return
    where = Path(str(home or DEFAULT_HOME)).expanduser()
    recorded = recorded_services(where)
    if not recorded:
        return
    for section, values in recorded.items():
        layered[section].update(values)
    kafka, url = recorded["kafka"]["bootstrap"], redact_url(recorded["database"]["url"])
    print(f"vecpipe: using the local services recorded in {where / SERVICES_FILE} (Kafka "
          f"{kafka}, PostgreSQL {url})", file=sys.stderr)
