"""Names shared by every pcipt component: API group, labels, finalizers, condition types,
event reasons and field managers.

This module holds constants only; it imports nothing from the rest of pcipt.
"""

from typing import Final

GROUP: Final = "pcipt.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

KIND_PCIDEVICE: Final = "PciDevice"
KIND_PCIFLAVOR: Final = "PciFlavor"
KIND_PASSTHROUGHVM: Final = "PassthroughVM"

PLURAL_PCIDEVICE: Final = "pcidevices"
PLURAL_PCIFLAVOR: Final = "pciflavors"
PLURAL_PASSTHROUGHVM: Final = "passthroughvms"

CATEGORY: Final = "pcipt"

# Labels the node plugin puts on every PciDevice so that `kubectl get -l` works.
LABEL_NODE: Final = f"{GROUP}/node"
LABEL_VENDOR: Final = f"{GROUP}/vendor"
LABEL_PRODUCT: Final = f"{GROUP}/product"
LABEL_CLASS: Final = f"{GROUP}/class"
# Label the controller puts on a scheduled PassthroughVM, so a node plugin watches only its own.
LABEL_VM_NODE: Final = f"{GROUP}/node"

FINALIZER_RELEASE: Final = f"{GROUP}/release-devices"

# PassthroughVM condition types (kstatus-friendly: Ready is the summary).
COND_SCHEDULED: Final = "Scheduled"
COND_DEVICES_BOUND: Final = "DevicesBound"
COND_DOMAIN_READY: Final = "DomainReady"
COND_READY: Final = "Ready"

# Field managers, so server-side apply and managedFields show who wrote what.
FIELD_MANAGER_CONTROLLER: Final = "pcipt-controller"
FIELD_MANAGER_NODEPLUGIN: Final = "pcipt-nodeplugin"

# Set by the node plugin when the VM's domain is gone from its node: the controller may then
# release the devices of a VM being deleted.
COND_DOMAIN_GONE: Final = "DomainGone"
# Set by the controller on VMs whose node stopped renewing its lease.
COND_NODE_ALIVE: Final = "NodeAlive"

# Node liveness: each node plugin renews the Lease `pcipt-node-<node>` in the operator's namespace.
NODE_LEASE_PREFIX: Final = "pcipt-node-"
DEFAULT_NAMESPACE: Final = "pcipt-system"

# Event reasons (CamelCase, one per transition).
REASON_SCHEDULED: Final = "Scheduled"
REASON_FAILED_SCHEDULING: Final = "FailedScheduling"
REASON_RELEASED: Final = "Released"
REASON_RECLAIMED: Final = "Reclaimed"
REASON_ORPHAN_RELEASED: Final = "OrphanReleased"
REASON_DEVICE_LOST: Final = "DeviceLost"
REASON_NODE_NOT_ALIVE: Final = "NodeNotAlive"
