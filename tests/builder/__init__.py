"""Builder tests: directory, tar layer and OCI layout sources → bootstrap + blobs, and the CLI."""
