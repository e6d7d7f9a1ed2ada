"""pcipt: pass host PCI devices through to virtual machines on Kubernetes.

This shared package holds what every component needs (the API models, constants, CRD
generation, the local control plane for tests and the demo). It imports neither kopf nor
libvirt: those belong to the controller and the node plugin.
"""

__version__ = "0.1.0"
