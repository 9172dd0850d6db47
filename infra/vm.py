"""NC H100 v5 VMs for the systemd target: Trusted Launch, SSH keys only, workload identity."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pulumi
from pulumi_azure_native import compute, devtestlab, network

from serving.stack.catalog import VM_IMAGES


@dataclass(frozen=True)
class GpuVmsArgs:
    resource_group_name: pulumi.Input[str]
    location: str
    subnet_id: pulumi.Input[str]
    subnet_cidr: str
    vm_names: tuple[str, ...]
    size: str
    image: str  # a key of serving.stack.catalog.VM_IMAGES
    os_disk_gb: int
    admin_user: str
    ssh_public_key: str
    public_ip: str  # none, dynamic or static
    encryption_at_host: bool
    identity_id: pulumi.Input[str]
    auto_shutdown_time: str  # HH:MM UTC, empty for none
    tags: dict[str, str]
    # The load balancer's backend pool every host's NIC joins (infra.loadbalancer).
    backend_pool_id: pulumi.Input[str] | None = None


@dataclass(frozen=True)
class Host:
    name: str
    address: pulumi.Output[str]
    private_address: str
    admin_user: str


def private_address(subnet_cidr: str, index: int) -> str:
    """Azure keeps the first four addresses of a subnet; hosts take fixed ones after them,
    so their addresses survive a redeploy and match what `fab deploy` was told."""
    return str(ipaddress.ip_network(subnet_cidr)[4 + index])


class GpuVms(pulumi.ComponentResource):
    def __init__(self, name: str, args: GpuVmsArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("exaone:infra:GpuVms", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        publisher, offer, sku, version = VM_IMAGES[args.image]
        self.vms: list[compute.VirtualMachine] = []
        self.hosts: list[Host] = []
        for index, vm_name in enumerate(args.vm_names):
            prefix = f"{name}-{index}"
            public_ip = None
            if args.public_ip != "none":
                # Basic public IPs are retired; a Standard one is always statically allocated,
                # so `dynamic` and `static` both get one. Standard IPs are closed inbound until
                # an NSG allows traffic, which the subnet's NSG does only for named networks.
                public_ip = network.PublicIPAddress(
                    f"{prefix}-ip",
                    resource_group_name=args.resource_group_name,
                    location=args.location,
                    sku=network.PublicIPAddressSkuArgs(
                        name=network.PublicIPAddressSkuName.STANDARD),
                    public_ip_allocation_method=network.IPAllocationMethod.STATIC,
                    tags=args.tags,
                    opts=child,
                )
            fixed_ip = private_address(args.subnet_cidr, index)
            nic = network.NetworkInterface(
                f"{prefix}-nic",
                resource_group_name=args.resource_group_name,
                location=args.location,
                enable_accelerated_networking=True,
                ip_configurations=[network.NetworkInterfaceIPConfigurationArgs(
                    name="primary",
                    primary=True,
                    subnet=network.SubnetArgs(id=args.subnet_id),
                    private_ip_allocation_method=network.IPAllocationMethod.STATIC,
                    private_ip_address=fixed_ip,
                    public_ip_address=(
                        network.PublicIPAddressArgs(id=public_ip.id) if public_ip else None),
                    load_balancer_backend_address_pools=(
                        [network.BackendAddressPoolArgs(id=args.backend_pool_id)]
                        if args.backend_pool_id is not None else None),
                )],
                tags=args.tags,
                opts=child,
            )
            vm = compute.VirtualMachine(
                f"{prefix}-vm",
                vm_name=vm_name,
                resource_group_name=args.resource_group_name,
                location=args.location,
                hardware_profile=compute.HardwareProfileArgs(vm_size=args.size),
                os_profile=compute.OSProfileArgs(
                    computer_name=vm_name,
                    admin_username=args.admin_user,
                    linux_configuration=compute.LinuxConfigurationArgs(
                        disable_password_authentication=True,
                        ssh=compute.SshConfigurationArgs(public_keys=[compute.SshPublicKeyArgs(
                            path=f"/home/{args.admin_user}/.ssh/authorized_keys",
                            key_data=args.ssh_public_key,
                        )]),
                        provision_vm_agent=True,
                    ),
                ),
                storage_profile=compute.StorageProfileArgs(
                    image_reference=compute.ImageReferenceArgs(
                        publisher=publisher, offer=offer, sku=sku, version=version),
                    os_disk=compute.OSDiskArgs(
                        create_option=compute.DiskCreateOptionTypes.FROM_IMAGE,
                        disk_size_gb=args.os_disk_gb,
                        caching=compute.CachingTypes.READ_WRITE,
                        delete_option=compute.DiskDeleteOptionTypes.DELETE,
                        managed_disk=compute.ManagedDiskParametersArgs(
                            storage_account_type=compute.StorageAccountTypes.PREMIUM_LRS),
                    ),
                ),
                # NC H100 v5 takes Gen2 images only; Trusted Launch needs Gen2 as well. The
                # NVIDIA driver must then be Canonical-signed (ubuntu-drivers), not DKMS-built.
                security_profile=compute.SecurityProfileArgs(
                    security_type=compute.SecurityTypes.TRUSTED_LAUNCH,
                    uefi_settings=compute.UefiSettingsArgs(
                        secure_boot_enabled=True, v_tpm_enabled=True),
                    # Needs the EncryptionAtHost feature registered on the subscription and a
                    # size whose EncryptionAtHostSupported capability is True in the region;
                    # Azure refuses the VM otherwise (preflight asks both).
                    encryption_at_host=True if args.encryption_at_host else None,
                ),
                network_profile=compute.NetworkProfileArgs(network_interfaces=[
                    compute.NetworkInterfaceReferenceArgs(
                        id=nic.id, primary=True,
                        delete_option=compute.DeleteOptions.DELETE),
                ]),
                # A list of identity ids on input; Azure answers with a map keyed by them.
                identity=compute.VirtualMachineIdentityArgs(
                    type=compute.ResourceIdentityType.USER_ASSIGNED,
                    user_assigned_identities=[args.identity_id],
                ),
                tags=args.tags,
                opts=child,
            )
            if args.auto_shutdown_time:
                devtestlab.GlobalSchedule(
                    f"{prefix}-shutdown",
                    # Azure finds a VM's auto-shutdown schedule by this exact name.
                    name=f"shutdown-computevm-{vm_name}",
                    resource_group_name=args.resource_group_name,
                    location=args.location,
                    status=devtestlab.EnableStatus.ENABLED,
                    task_type="ComputeVmShutdownTask",
                    daily_recurrence=devtestlab.DayDetailsArgs(
                        time=args.auto_shutdown_time.replace(":", "")),
                    time_zone_id="UTC",
                    target_resource_id=vm.id,
                    notification_settings=devtestlab.NotificationSettingsArgs(
                        status=devtestlab.EnableStatus.DISABLED),
                    tags=args.tags,
                    opts=child,
                )
            address = public_ip.ip_address.apply(lambda ip, fixed=fixed_ip: ip or fixed) \
                if public_ip else pulumi.Output.from_input(fixed_ip)
            self.vms.append(vm)
            self.hosts.append(Host(vm_name, address, fixed_ip, args.admin_user))
        self.register_outputs({"hosts": [h.name for h in self.hosts]})
