"""The real test bed of kubedock-dns: a control plane, network namespaces and a DNS upstream.

Used by the tests and by the demo command; it is not part of the installed package.  Each module
starts real processes on loopback (or in network namespaces) and stops them without leaving any
behind: :mod:`testbed.controlplane` runs etcd and kube-apiserver; :mod:`testbed.image` makes a
Debian base, builds images with podman and runs a registry on loopback.
"""
