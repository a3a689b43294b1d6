"""A real single-node Kubernetes cluster on this machine (see :mod:`testbed.node.cluster`)."""
