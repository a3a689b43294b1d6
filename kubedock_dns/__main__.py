"""``python -m kubedock_dns``: the ``kubedock-dns`` command (see :mod:`kubedock_dns.cli`)."""

import sys

from kubedock_dns.cli import main

sys.exit(main())
