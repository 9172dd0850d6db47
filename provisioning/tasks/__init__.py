"""What `fab --list` shows: one module per task namespace; ``provisioning`` composes them."""
