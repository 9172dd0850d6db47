"""`fab` looks for a collection named by tasks.collection_name before it reads the project's
fabric.yaml (project config is located *by* the collection), so this shim hands it the
provisioning/ collection; everything else about Fabric is configured in fabric.yaml."""

from provisioning import ns  # noqa: F401
