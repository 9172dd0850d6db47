"""Pure functions of the spec: the vLLM command line and environment (``vllm_args``, the one
place they are computed), the systemd unit, the monitoring rules and the artifact set written
by ``render``. Nothing here talks to a server or a host."""
