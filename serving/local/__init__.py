"""The local target, this machine's CPU through vLLM's CPU build: set up and run the server,
its CLI and the demo, and the makers of the tiny EXAONE-architecture model and PEFT adapters
(also the test fixtures). Only the CLI, the demo and tests import it."""
