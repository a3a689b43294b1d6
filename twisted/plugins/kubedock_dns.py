# The twistd plugin: a ServiceMaker naming its tap module as a string, so that nothing (klein,
# which imports the global reactor) is imported before `twistd --reactor` has chosen a reactor.
from twisted.application.service import ServiceMaker

kubedock_dns = ServiceMaker(
    "kubedock-dns",
    "kubedock_dns.tap",
    "Docker-network DNS, admission webhook and pod watcher for kubedock",
    "kubedock-dns",
)
