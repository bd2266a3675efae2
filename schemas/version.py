"""Schema version of shard samples, index rows and dataset manifests."""

# Bump when a field changes meaning or a required field is added; readers refuse newer versions.
SCHEMA_VERSION = 1
