"""The local control plane (etcd + kube-apiserver on loopback) that tests, benchmarks and the
demo run against, and the tools to build its binaries and install pcipt's CRDs into it.

Not for production: certificates are throw-away and etcd may run without fsync.
"""

from pcipt.devcluster.binaries import ETCD_VERSION, KUBERNETES_VERSION, Binaries, BinaryError
from pcipt.devcluster.cluster import ClusterError, ClusterState, LocalCluster

__all__ = [
    "ETCD_VERSION",
    "KUBERNETES_VERSION",
    "Binaries",
    "BinaryError",
    "ClusterError",
    "ClusterState",
    "LocalCluster",
]
