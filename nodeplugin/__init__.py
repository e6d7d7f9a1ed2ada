"""The pcipt node agent (DaemonSet): discovers host PCI devices and runs VMs in libvirt."""
