"""The churn benchmark churns what it says (pure parts; no control plane)."""

from __future__ import annotations

from bench.churn import _bystander, _companion
from bench.topology import Topology
from kubedock_dns.contract import pod_record_from_dict


def test_churned_companions_share_the_askers_networks_but_no_asked_name_or_address():
    """Each network gets a ``cache`` pod with an address of its own; the bystander copy is the
    same pod without the opt-in label, so the watcher never sees it."""
    topology = Topology(50)
    pods = topology.pods()
    used = {p.ip for p in pods}
    asked = {q.view_name.split(".")[0] for s in topology.sources(8) for q in topology.queries_for(s)}
    names = set()
    for db in (p for p in pods if p.role == "db"):
        companion = _companion(topology, db)
        record = pod_record_from_dict({**companion, "metadata": {**companion["metadata"], "uid": "u"}})
        assert record.networks == (db.network.id,)
        assert record.ips[0] not in used
        used.add(record.ips[0])
        assert not set(record.names) & asked
        names.add(companion["metadata"]["name"])
        assert "kubedock" not in _bystander(companion)["metadata"]["labels"]
    assert len(names) == 50

