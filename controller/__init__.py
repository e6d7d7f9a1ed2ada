"""The pcipt operator program (kopf): schedules PassthroughVMs onto free PciDevices."""
