"""The libvirt domain subset pcipt uses, as types (model.py), and the pure function from a
scheduled PassthroughVM to a domain (build.py) and from a domain to XML (render.py)."""
