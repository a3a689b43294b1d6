"""``python -m kubedock_dns``: the ``kubedock-dns`` command (see :mod:`kubedock_dns.ops.cli`)."""

import sys

from kubedock_dns.ops.cli import main

sys.exit(main())
