"""The kubectl plugin (`kubectl pcipt`)."""
