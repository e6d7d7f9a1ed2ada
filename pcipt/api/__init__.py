"""The pcipt API, by version. v1alpha1 is the only one."""
