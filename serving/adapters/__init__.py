"""The adapter life cycle at runtime: the vLLM admin client, the answer check that decides
which weights answer, the operations (add, hotfix, rollback, remove, settle, reconcile), the
record of versions, the resolver folder, the PEFT checks, and the ``adapters`` CLI. Travels to
the VMs with ``stack`` and ``host``."""
