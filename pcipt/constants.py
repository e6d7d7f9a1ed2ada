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
# The field a node plugin selects its VMs by (the CRD's selectableFields): the status write
# that places a VM is all it takes for the node to see it.
FIELD_VM_NODE: Final = "status.nodeName"

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
REASON_NODE_ALIVE: Final = "NodeAlive"
REASON_TERMINATING: Final = "Terminating"

# Why a VM cannot be placed (its Scheduled condition, FailedScheduling Events).
REASON_FLAVOR_NOT_FOUND: Final = "FlavorNotFound"
REASON_NOT_PERMITTED: Final = "NotPermitted"
REASON_NETWORK_NOT_ALLOWED: Final = "NetworkNotAllowed"
REASON_IMAGE_NOT_SUPPORTED: Final = "ImageNotSupported"
REASON_LIMIT_EXCEEDED: Final = "LimitExceeded"
REASON_UNSCHEDULABLE: Final = "Unschedulable"

# The node plugin's reasons: a PciDevice's Healthy condition, a PF's VFsConfigured, a VM's
# DomainReady and DomainGone, and the Events about them.
REASON_PRESENT: Final = "Present"
REASON_NOT_FOUND: Final = "NotFound"
REASON_NOT_IN_DEVICE_SPEC: Final = "NotInDeviceSpec"
REASON_DEVICE_SPEC_INVALID: Final = "DeviceSpecInvalid"
REASON_NOT_BOUND_TO_VFIO: Final = "NotBoundToVfio"
REASON_VFIO_NOT_LOADED: Final = "VfioNotLoaded"
REASON_DEVICE_BUSY: Final = "DeviceBusy"
REASON_DEVICE_GONE: Final = "DeviceGone"
REASON_BIND_REFUSED: Final = "BindRefused"
REASON_UNBIND_REFUSED: Final = "UnbindRefused"
REASON_PREPARE_FAILED: Final = "PrepareFailed"
REASON_RESTORE_FAILED: Final = "RestoreFailed"
REASON_VFS_CONFIGURED: Final = "VFsConfigured"
REASON_VF_COUNT_REFUSED: Final = "VFCountRefused"
REASON_VF_COUNT_FAILED: Final = "VFCountFailed"
REASON_DEVICE_NOT_CLAIMED: Final = "DeviceNotClaimed"
REASON_DEVICE_IN_USE: Final = "DeviceInUse"
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_START_FAILED: Final = "StartFailed"
REASON_RUNNING: Final = "Running"
REASON_STOPPED: Final = "Stopped"
REASON_DOMAIN_REMOVED: Final = "DomainRemoved"

# Evacuation (controller): Kubernetes' non-graceful node shutdown taint, set by an admin or a
# fencing agent on a node that is down; and the Node label by which an admin opts a node group
# in to evacuation after its lease has lapsed that many seconds.
TAINT_OUT_OF_SERVICE: Final = "node.kubernetes.io/out-of-service"
LABEL_EVACUATE_AFTER: Final = f"{GROUP}/evacuate-after-seconds"
COND_EVACUATED: Final = "Evacuated"
REASON_EVACUATED: Final = "Evacuated"
REASON_EVACUATION_WAITING: Final = "WaitingForNode"

# Device health as VMs see it (controller): a VM using an Unhealthy or Missing device.
COND_DEVICES_HEALTHY: Final = "DevicesHealthy"
REASON_DEVICES_HEALTHY: Final = "DevicesHealthy"
REASON_DEVICE_UNHEALTHY: Final = "DeviceUnhealthy"

# Device health causes the node plugin finds, and scrubbing a released device.
REASON_AER_FATAL: Final = "FatalPcieErrors"
REASON_IOMMU_GROUP_CHANGED: Final = "IommuGroupChanged"
REASON_SCRUBBED: Final = "Scrubbed"
REASON_SCRUB_FAILED: Final = "ScrubFailed"
# On a node Lease: the node plugin scrubs released devices (the controller then holds each
# released device back until its scrub is reported).
ANNOTATION_SCRUBS: Final = f"{GROUP}/scrubs-released-devices"

# Cold migration: `kubectl pcipt migrate` writes this annotation on the VM, a JSON object
# {"id": ..., "to": NODE or absent}; the controller answers in status.migration.
ANNOTATION_MIGRATE: Final = f"{GROUP}/migrate"
REASON_MIGRATING: Final = "Migrating"
REASON_MIGRATED: Final = "Migrated"
REASON_MIGRATION_FAILED: Final = "MigrationFailed"
# Live migration: the VM carries this label while a live migration to that node runs, so the
# target's node plugin sees it (it watches VMs labelled with its node, and this); a node
# plugin that can receive live migrations says where on its Lease.
LABEL_MIGRATION_TARGET: Final = f"{GROUP}/migration-target"
ANNOTATION_MIGRATION_URI: Final = f"{GROUP}/migration-uri"
REASON_LIVE_MIGRATED: Final = "LiveMigrated"
LIVE_PHASES: Final = ("Preparing", "Ready", "Transferring", "Transferred")
"""A live migration in these phases holds devices (and CPUs, memory) on two nodes."""

# Hot-plug. The controller places requests added to a running VM on its node and writes
# RestartRequired for changes it cannot apply live; the node plugin attaches and detaches, and
# says how that went in DevicesAttached.
COND_RESTART_REQUIRED: Final = "RestartRequired"
COND_DEVICES_ATTACHED: Final = "DevicesAttached"
REASON_SPEC_CHANGED: Final = "SpecChanged"
REASON_SPEC_APPLIED: Final = "SpecApplied"
REASON_HOTPLUG_REFUSED: Final = "HotplugRefused"
REASON_HOTPLUGGED: Final = "Hotplugged"
REASON_DETACHING: Final = "Detaching"
REASON_ATTACHED: Final = "Attached"
REASON_HOTPLUG_FAILED: Final = "HotplugFailed"
REASON_HOTPLUG_UNSUPPORTED: Final = "HotplugUnsupported"
