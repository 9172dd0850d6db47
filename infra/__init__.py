"""The Pulumi program: one component per concern, composed by ``infra/__main__.py``."""
