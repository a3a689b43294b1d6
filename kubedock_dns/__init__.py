"""kubedock-dns: Docker-network name resolution for kubedock pods sharing one namespace."""

__version__ = "0.1.0"
