"""KMS providers behind one interface, chosen by key-URI prefix, and the key service."""
