"""Platform connectors behind one protocol (``base``) and their registry (``registry``)."""
