"""How imstream processes are assembled and operated: settings, the CLI, the local stack."""
