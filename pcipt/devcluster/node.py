"""A one-node Kubernetes whose pods really run: etcd, kube-apiserver, kube-controller-manager,
kube-scheduler, kubelet with containerd and runc, kube-proxy and a bridge CNI — plus a libvirtd
serving libvirt's test driver, as a virtualization host would have one.

Everything runs inside a private network namespace (a veth pair gives the node an address the
machine can reach) and a private mount namespace (slave propagation) where /run, /var/lib and
/var/log are the node's own folders and /proc/sys is read-only but for the namespace's own
network settings. Ports, iptables rules, CNI bridges, pod network namespaces, mounts and
kernel settings never reach the machine it runs on. Every process lives in a cgroup of the
node's own (`pcipt-<id>`, also the kubelet's cgroupRoot), which is how teardown finds each one,
pods' included, before it removes the cgroups, the network namespace and the state folder.

Not for production. Needs root, containerd, runc, the CNI plugins, iproute2 and iptables (see
hack/install-system-deps.sh); the Kubernetes binaries come from `binaries`. Images cannot be
pulled: `load_image` imports ones built here (buildah), and pods use imagePullPolicy Never.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from pcipt.devcluster import binaries, certs, images
from pcipt.devcluster.cluster import (
    ClusterError,
    _tail,
    apiserver_command,
    apiserver_ready,
    etcd_command,
    read_state,
    write_kubeconfig,
)

Log = Callable[[str], None]
REPO = Path(__file__).resolve().parent.parent.parent

API_PORT = 6443
# How the node's own components reach the API server: the namespace's loopback.
LOCAL_SERVER = f"https://127.0.0.1:{API_PORT}"
POD_SUBNET = "10.244.0.0/24"
SERVICE_RANGE = "10.0.0.0/24"  # as apiserver_command sets it
# The node's veth pairs take /30s from here; one that an interface already uses is skipped.
NODE_NETWORKS = ipaddress.IPv4Network("10.213.0.0/16")
PAUSE_IMAGE = "localhost/pcipt-pause:1"
CGROUP_FS = Path("/sys/fs/cgroup")
NETNS_DIR = "/run/netns"
# What must be on the machine, by the package that brings it (hack/install-system-deps.sh).
TOOLS = {
    "containerd": "containerd",
    "runc": "runc",
    "ctr": "containerd",
    "ip": "iproute2",
    "iptables": "iptables",
    "conntrack": "conntrack",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "buildah": "buildah",
    "gcc": "gcc",
}
CNI_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
# Started in this order by the supervisor; stopped in the reverse order.
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "containerd",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "libvirtd",
    "libvirt-keeper",
)

_DETACHED: list[subprocess.Popen[bytes]] = []
"""Supervisors started by this process, kept referenced while they run."""


class NodeError(ClusterError):
    """The node did not come up or go down cleanly; the message says why."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class NodeState:
    state_dir: str
    node_name: str
    netns: str
    host_veth: str
    host_ip: str
    node_ip: str
    cgroup: str
    server: str
    kubeconfig: str
    containerd_socket: str
    kubernetes_version: str
    supervisor_pid: int = 0
    started_at: float = 0.0
    made_netns_mount: bool = False
    """/run/netns was no mount point before `ip netns add` made it one: unmount it at the end."""
    made_netns_dir: bool = False
    """... nor a folder: remove it too."""


def find_cni_dir() -> Path:
    for d in CNI_DIRS:
        if (d / "bridge").exists() and (d / "host-local").exists():
            return d
    raise NodeError(
        "the CNI plugins (bridge, host-local) are missing: install containernetworking-plugins"
    )


def missing_tools() -> list[str]:
    """Packages to install before a node can run (empty when all is there)."""
    missing = {pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None}
    if not any((d / "bridge").exists() for d in CNI_DIRS):
        missing.add("containernetworking-plugins")
    return sorted(missing)


def _run(cmd: list[str], *, check: bool = True, input: bytes | None = None) -> str:
    proc = subprocess.run(cmd, capture_output=True, input=input, check=False, timeout=300)
    if check and proc.returncode != 0:
        raise NodeError(
            f"`{' '.join(cmd)}` failed ({proc.returncode}): {proc.stderr.decode().strip()}"
        )
    return proc.stdout.decode()


def _used_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    out = _run(["ip", "-o", "-4", "addr", "show"], check=False)
    nets = []
    for line in out.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.ip_interface(parts[parts.index("inet") + 1]).network)
    return nets


def _pick_network() -> ipaddress.IPv4Network:
    used = _used_networks()
    for net in NODE_NETWORKS.subnets(new_prefix=30):
        if not any(net.overlaps(u) for u in used):
            return net
    raise NodeError(f"no free /30 left in {NODE_NETWORKS} for the node's veth pair")


# --- configuration files -----------------------------------------------------------------------


def containerd_config(state: Path, cni_dir: Path) -> str:
    """containerd 1.6 (config version 2) for the CRI, with the settings this kind of machine
    needs: no CAP_SYS_RESOURCE, so oom_score_adj may only be raised."""
    return f"""version = 2
# Plugins that need kernel features or folders outside the node; the node uses none of them.
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{state / "containerd.sock"}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{state / "containerd-opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_dir}"
    conf_dir = "{state / "cni"}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"""


def cni_config() -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "pcipt-node",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_SUBNET}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=2,
    )


def kubelet_config(state: Path, cgroup: str, pki: certs.Pki) -> str:
    config = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # Reached only inside the node's network namespace (logs, exec from the API server).
        "authentication": {
            "anonymous": {"enabled": True},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(pki.ca_cert)},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{cgroup}",
        # This kind of machine: cgroup v1, swap possibly on, kernel settings not ours to change.
        "failCgroupV1": False,
        "failSwapOn": False,
        "protectKernelDefaults": False,
        "containerRuntimeEndpoint": f"unix://{state / 'containerd.sock'}",
        "readOnlyPort": 0,
        "clusterDomain": "cluster.local",
        "resolvConf": str(state / "resolv.conf"),
        "serializeImagePulls": False,
        # Images are imported, never pulled: never collect them, and do not evict on a full disk
        # of a CI machine before it is really full.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "4s",
        "fileCheckFrequency": "0s",
    }
    return yaml.safe_dump(config, sort_keys=False)


# The kernel settings the kubelet insists on (its container manager will not start otherwise)
# and the values it wants. The node's mount namespace shows it files with these values over the
# real /proc/sys entries, so it writes none of the machine's.
KUBELET_SYSCTLS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}

LIBVIRTD_CONF = """# libvirtd of the local node: only the built-in test driver (the other drivers'
# modules are hidden in the node's mount namespace), no authentication on its socket.
unix_sock_dir = "/run/libvirt"
auth_unix_rw = "none"
auth_unix_ro = "none"
unix_sock_group = "root"
"""


# --- the node ----------------------------------------------------------------------------------


class LocalNode:
    """The control plane and one node in private namespaces, under `state_dir`."""

    def __init__(
        self, state_dir: Path, *, node_name: str = "pcipt-node", log: Log = _stderr
    ) -> None:
        self.state_dir = state_dir
        self.node_name = node_name
        self.log = log

    @property
    def state_file(self) -> Path:
        return self.state_dir / "node.json"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    def state(self) -> NodeState | None:
        return read_state(self.state_file, NodeState)

    def _save(self, st: NodeState) -> None:
        self.state_file.write_text(json.dumps(asdict(st), indent=2))

    def is_running(self) -> bool:
        st = self.state()
        return st is not None and _supervisor_alive(st) and self._ready(st)

    def _ready(self, st: NodeState) -> bool:
        return apiserver_ready(st.server, self.state_dir / "pki")

    def up(self, timeout: float = 180.0) -> NodeState:
        """Start everything (or return the running node) and wait until the node is Ready."""
        if self.is_running():
            st = self.state()
            assert st is not None
            return st
        if self.state_file.exists():
            self.down()
        if os.geteuid() != 0:
            raise NodeError("a local node needs root (namespaces, mounts, cgroups)")
        if missing := missing_tools():
            raise NodeError(f"missing packages: {' '.join(missing)} (hack/install-system-deps.sh)")
        bins = binaries.ensure(self.log)
        node_bins = binaries.ensure_node(self.log)
        cni_dir = find_cni_dir()
        started = time.monotonic()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ident = uuid.uuid4().hex[:8]
        net = _pick_network()
        host_ip, node_ip = (str(a) for a in list(net.hosts())[:2])
        st = NodeState(
            state_dir=str(self.state_dir),
            node_name=self.node_name,
            netns=f"pcipt-{ident}",
            host_veth=f"pcipt{ident[:6]}",
            host_ip=host_ip,
            node_ip=node_ip,
            cgroup=f"pcipt-{ident}",
            server=f"https://{node_ip}:{API_PORT}",
            kubeconfig=str(self.kubeconfig),
            containerd_socket=str(self.state_dir / "containerd.sock"),
            kubernetes_version=binaries.KUBERNETES_VERSION,
        )
        self._save(st)  # from here on, down() knows what to remove
        try:
            self._network(st)
            _make_cgroups(st.cgroup)
            pki = certs.generate(self.state_dir / "pki", extra_names=[node_ip])
            write_kubeconfig(self.kubeconfig, st.server, pki)
            # The components talk to the API server on the namespace's loopback.
            write_kubeconfig(self.state_dir / "local.kubeconfig", LOCAL_SERVER, pki)
            plan = self._plan(st, bins, node_bins, pki, cni_dir)
            (self.state_dir / "plan.json").write_text(json.dumps(plan, indent=2))
            st.supervisor_pid = self._start_supervisor(st)
            st.started_at = time.time()
            self._save(st)
            self._wait(st, started + timeout)
            self.load_image(images.pause_archive(PAUSE_IMAGE, self.log))
            self.log(
                f"devcluster: node {self.node_name} Ready at {node_ip} after "
                f"{time.monotonic() - started:.1f}s"
            )
        except BaseException:
            self.down(keep_logs=True)
            self.log(
                f"devcluster: the node did not start; its logs are in {self.state_dir / 'logs'}"
            )
            raise
        return st

    # --- set-up ----------------------------------------------------------------------------

    def _network(self, st: NodeState) -> None:
        peer = f"{st.host_veth}n"
        st.made_netns_mount = NETNS_DIR not in _mounts()
        st.made_netns_dir = not Path(NETNS_DIR).exists()
        self._save(st)
        _run(["ip", "netns", "add", st.netns])
        _run(["ip", "link", "add", st.host_veth, "type", "veth", "peer", "name", peer])
        _run(["ip", "link", "set", peer, "netns", st.netns])
        _run(["ip", "addr", "add", f"{st.host_ip}/30", "dev", st.host_veth])
        _run(["ip", "link", "set", st.host_veth, "up"])
        inside = ["ip", "-n", st.netns]
        _run([*inside, "link", "set", "lo", "up"])
        _run([*inside, "link", "set", peer, "name", "eth0"])
        _run([*inside, "addr", "add", f"{st.node_ip}/30", "dev", "eth0"])
        _run([*inside, "link", "set", "eth0", "up"])
        # No default route: pods reach the node and each other, nothing beyond the machine. The
        # service range needs a route for host-network processes (the node plugin): kube-proxy's
        # DNAT happens after the routing decision. Should a packet to it leave before kube-proxy
        # set its rules, the machine's end of the veth forwards nothing it receives.
        _run([*inside, "route", "add", SERVICE_RANGE, "dev", "eth0"])
        Path(f"/proc/sys/net/ipv4/conf/{st.host_veth}/forwarding").write_text("0\n")

    def _plan(
        self,
        st: NodeState,
        bins: binaries.Binaries,
        node_bins: dict[str, Path],
        pki: certs.Pki,
        cni_dir: Path,
    ) -> dict[str, object]:
        """What the supervisor starts, in order, and the folders it mounts."""
        s = self.state_dir
        for sub in (
            "root/var/lib",
            "root/var/log",
            "cni",
            "logs",
            "containerd-opt",
            "empty",
            "sysctl",
        ):
            (s / sub).mkdir(parents=True, exist_ok=True)
        sysctls = {}
        for key, value in KUBELET_SYSCTLS.items():
            shown = s / "sysctl" / key.replace("/", ".")
            shown.write_text(value + "\n")
            sysctls[str(shown)] = f"/proc/sys/{key}"
        (s / "containerd.toml").write_text(containerd_config(s, cni_dir))
        (s / "cni" / "10-pcipt-node.conflist").write_text(cni_config())
        (s / "kubelet.yaml").write_text(kubelet_config(s, st.cgroup, pki))
        (s / "resolv.conf").write_text("# the local node has no DNS\n")
        (s / "libvirtd.conf").write_text(LIBVIRTD_CONF)
        local = str(s / "local.kubeconfig")
        commands: dict[str, list[str]] = {
            "etcd": etcd_command(
                bins.etcd,
                s / "etcd",
                "http://127.0.0.1:2379",
                "http://127.0.0.1:2380",
                fsync=False,
            ),
            "kube-apiserver": apiserver_command(
                bins.kube_apiserver,
                pki,
                s / "pki",
                etcd_url="http://127.0.0.1:2379",
                bind="0.0.0.0",
                advertise=st.node_ip,
                port=API_PORT,
                issuer="https://kubernetes.default.svc.cluster.local",
                extra=[
                    # logs and exec reach the kubelet by the node's address, not its name
                    "--kubelet-preferred-address-types=InternalIP",
                    # webhooks are called on their endpoints: no cluster DNS is needed
                    "--enable-aggregator-routing=true",
                ],
            ),
            "containerd": ["containerd", "--config", str(s / "containerd.toml")],
            "kube-controller-manager": [
                str(node_bins["kube-controller-manager"]),
                f"--kubeconfig={local}",
                f"--authentication-kubeconfig={local}",
                f"--authorization-kubeconfig={local}",
                f"--root-ca-file={pki.ca_cert}",
                f"--service-account-private-key-file={pki.sa_key}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--v=1",
            ],
            "kube-scheduler": [
                str(node_bins["kube-scheduler"]),
                f"--kubeconfig={local}",
                f"--authentication-kubeconfig={local}",
                f"--authorization-kubeconfig={local}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--v=1",
            ],
            "kubelet": [
                str(node_bins["kubelet"]),
                f"--config={s / 'kubelet.yaml'}",
                f"--kubeconfig={local}",
                f"--hostname-override={st.node_name}",
                f"--node-ip={st.node_ip}",
                "--v=1",
            ],
            "kube-proxy": [
                str(node_bins["kube-proxy"]),
                f"--kubeconfig={local}",
                f"--hostname-override={st.node_name}",
                "--proxy-mode=iptables",
                f"--cluster-cidr={POD_SUBNET}",
                # Zero: leave the machine-wide conntrack settings alone.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--metrics-bind-address=127.0.0.1:10249",
                "--healthz-bind-address=127.0.0.1:10256",
                "--v=1",
            ],
        }
        if shutil.which("libvirtd") and shutil.which("virsh"):
            commands["libvirtd"] = ["libvirtd", "--config", str(s / "libvirtd.conf")]
            # The test driver keeps its domains while one connection is open: this one, like a
            # host's libvirtd, outlives any node-plugin pod.
            commands["libvirt-keeper"] = [
                "virsh",
                "-c",
                "test+unix:///default?socket=/run/libvirt/libvirt-sock",
                "event",
                "--all",
                "--loop",
            ]
        drivers = sorted(Path("/usr/lib").glob("*/libvirt/connection-driver"))
        return {
            "commands": {name: commands[name] for name in COMPONENTS if name in commands},
            "binds": {
                str(s / "root" / "var" / "lib"): "/var/lib",
                str(s / "root" / "var" / "log"): "/var/log",
                **{str(s / "empty"): str(d) for d in drivers},
            },
            "sysctls": sysctls,
            "containerd_socket": st.containerd_socket,
            "kubeconfig": local,
            "cgroup": st.cgroup,
        }

    def _start_supervisor(self, st: NodeState) -> int:
        cmd = [
            "nsenter",
            f"--net=/run/netns/{st.netns}",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "--",
            sys.executable,
            "-m",
            "pcipt.devcluster.node",
            "supervise",
            str(self.state_dir),
        ]
        with open(self.state_dir / "logs" / "supervisor.log", "ab") as fh:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        _join_cgroup(st.cgroup, proc.pid)
        # It outlives this call (stop() finds it by pid): keep the Popen, so it is not collected
        # while the supervisor runs (a ResourceWarning, and no reaping of its exit).
        _DETACHED.append(proc)
        return proc.pid

    def _wait(self, st: NodeState, deadline: float) -> None:
        """Until the API server answers and the node is Ready."""
        kubectl = str(binaries.ensure().kubectl)
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        last = ""
        while time.monotonic() < deadline:
            supervisor_log = self.state_dir / "logs" / "supervisor.log"
            exited = [ln for ln in _tail(supervisor_log, 200).splitlines() if " exited with " in ln]
            if not _supervisor_alive(st) or exited:
                name = exited[0].split("supervisor: ", 1)[-1].split()[0] if exited else "supervisor"
                raise NodeError(
                    f"{name} stopped while the node started:\n"
                    + _tail(self.state_dir / "logs" / f"{name}.log", 15)
                )
            if self._ready(st):
                got = subprocess.run(
                    [
                        kubectl,
                        "get",
                        "node",
                        st.node_name,
                        "-o",
                        "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                    ],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=30,
                    check=False,
                )
                last = got.stdout.strip() or got.stderr.strip()
                if got.stdout.strip() == "True":
                    return
            time.sleep(0.5)
        raise NodeError(
            f"node {st.node_name} was not Ready in time (last: {last!r}). kubelet log:\n"
            + _tail(self.state_dir / "logs" / "kubelet.log", 25)
        )

    # --- images ------------------------------------------------------------------------------

    def load_image(self, archive: Path) -> None:
        """Import an image archive (docker-archive or oci-archive) into the node's containerd."""
        st = self.state()
        if st is None:
            raise NodeError("the node is not running")
        ctr = ["ctr", "--address", st.containerd_socket, "--namespace", "k8s.io"]
        _run([*ctr, "images", "import", "--no-unpack", str(archive)])
        self.log(f"devcluster: imported {archive.name} into the node")

    def load_pcipt_image(self, tag: str = images.PCIPT_IMAGE) -> None:
        """Build pcipt's image from this tree (once per process) and import it as `tag`."""
        self.load_image(images.pcipt_archive(tag, self.log))

    # --- teardown ----------------------------------------------------------------------------

    def down(self, *, keep_logs: bool = False) -> None:
        """Stop every process of the node (pods included), then remove its cgroups, network
        namespace and state folder. Safe to call on a half-started or crashed node."""
        st = self.state()
        if st is not None:
            if _supervisor_alive(st):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(st.supervisor_pid, signal.SIGTERM)
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline and _supervisor_alive(st):
                    time.sleep(0.2)
            _kill_cgroup(st.cgroup)
            _remove_cgroups(st.cgroup)
            _run(["ip", "netns", "del", st.netns], check=False)
            _run(["ip", "link", "del", st.host_veth], check=False)
            if (
                st.made_netns_mount
                and NETNS_DIR in _mounts()
                and not any(Path(NETNS_DIR).iterdir())
            ):
                _run(["umount", NETNS_DIR], check=False)
                if st.made_netns_dir:
                    with contextlib.suppress(OSError):
                        Path(NETNS_DIR).rmdir()
            leftover = [m for m in _mounts() if m.startswith(str(self.state_dir))]
            if leftover:
                raise NodeError(f"mounts of the node are still on the machine: {leftover}")
        if keep_logs:
            for child in self.state_dir.iterdir() if self.state_dir.exists() else []:
                if child.name != "logs":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        else:
            shutil.rmtree(self.state_dir, ignore_errors=True)


# --- cgroups, processes, mounts ------------------------------------------------------------------


def _hierarchies() -> list[Path]:
    """The cgroup hierarchies: the v2 root, or each v1 hierarchy and the hybrid v2 one
    (`unified`, where runc makes cgroups too)."""
    if (CGROUP_FS / "cgroup.controllers").exists():
        return [CGROUP_FS]
    return sorted(
        p
        for p in CGROUP_FS.iterdir()
        if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists()
    )


def _make_cgroups(name: str) -> None:
    for h in _hierarchies():
        d = h / name
        d.mkdir(exist_ok=True)
        # A v1 cpuset cgroup takes no task until its CPUs and memory nodes are set.
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (d / knob).exists() and not (d / knob).read_text().strip():
                (d / knob).write_text((h / knob).read_text())


def _join_cgroup(name: str, pid: int) -> None:
    """Move pid into the node's cgroup in every hierarchy (before it starts anything)."""
    for h in _hierarchies():
        procs = h / name / "cgroup.procs"
        with contextlib.suppress(OSError):
            procs.write_text(str(pid))


def cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for h in _hierarchies():
        root = h / name
        if not root.exists():
            continue
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def _kill_cgroup(name: str, timeout: float = 20.0) -> None:
    """SIGKILL every process in the node's cgroups until none is left (pods, shims, all)."""
    deadline = time.monotonic() + timeout
    while (pids := cgroup_pids(name)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    if pids := cgroup_pids(name):
        raise NodeError(f"processes of the node survived SIGKILL: {sorted(pids)}")


def _remove_cgroups(name: str, timeout: float = 10.0) -> None:
    """Remove the node's cgroups, deepest first. A cgroup whose last process was just killed
    can stay busy for a moment while the kernel releases it: try again until `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        left = []
        for h in _hierarchies():
            root = h / name
            if not root.exists():
                continue
            for d in sorted(
                (p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
            ):
                with contextlib.suppress(OSError):
                    d.rmdir()
            with contextlib.suppress(OSError):
                root.rmdir()
            if root.exists():
                left.append(root)
        if not left:
            return
        if time.monotonic() > deadline:
            raise NodeError(f"could not remove the node's cgroups: {left}")
        time.sleep(0.2)


def _mounts() -> list[str]:
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return []
    return [line.split()[4] for line in lines]


def _supervisor_alive(st: NodeState) -> bool:
    if not st.supervisor_pid:
        return False
    try:
        cmdline = Path(f"/proc/{st.supervisor_pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{st.supervisor_pid}/stat").read_text()
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    return b"supervise" in cmdline and st.state_dir.encode() in cmdline


# --- the supervisor (runs inside the node's namespaces) -------------------------------------------


def _mount(*args: str) -> None:
    _run(["mount", *args])


def _private_filesystem(plan: dict[str, object]) -> None:
    """The node's view of the filesystem: its own /run, /var/lib, /var/log; /proc/sys read-only
    but for net/ (this network namespace's own settings, which kube-proxy and the CNI set)."""
    _mount("-t", "tmpfs", "-o", "mode=755", "tmpfs", "/run")
    binds = plan["binds"]
    assert isinstance(binds, dict)
    for source, target in binds.items():
        _mount("--bind", source, target)
    _mount("--bind", "/proc/sys", "/proc/sys")
    _mount("-o", "remount,bind,ro", "/proc/sys")
    _mount("--bind", "/proc/sys/net", "/proc/sys/net")
    _mount("-o", "remount,bind,rw", "/proc/sys/net")
    sysctls = plan["sysctls"]
    assert isinstance(sysctls, dict)
    for shown, entry in sysctls.items():
        _mount("--bind", "-o", "ro", shown, entry)
    for sub in ("/run/libvirt", "/var/lib/libvirt", "/var/log/libvirt", "/var/lib/kubelet"):
        Path(sub).mkdir(parents=True, exist_ok=True)


def supervise(state_dir: Path) -> int:
    """Start the node's components in order, keep them, stop them on SIGTERM."""
    plan = json.loads((state_dir / "plan.json").read_text())
    logs = state_dir / "logs"
    procs: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def say(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} supervisor: {msg}", flush=True)

    def on_term(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    _private_filesystem(plan)
    commands: dict[str, list[str]] = plan["commands"]
    try:
        for name, cmd in commands.items():
            if stopping:
                break
            with open(logs / f"{name}.log", "ab") as fh:
                procs[name] = subprocess.Popen(
                    cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT
                )
            say(f"started {name} pid={procs[name].pid}")
            if name == "kube-apiserver":
                _wait_for(
                    lambda: apiserver_ready(LOCAL_SERVER, state_dir / "pki"),
                    90,
                    f"{name} ready",
                    procs,
                )
            elif name == "containerd":
                sock = Path(plan["containerd_socket"])
                _wait_for(sock.exists, 30, "containerd's socket", procs)
            elif name == "libvirtd":
                _wait_for(Path("/run/libvirt/libvirt-sock").exists, 30, "libvirtd's socket", procs)
        say("all started")
        while not stopping:
            for name, p in procs.items():
                if p.poll() is not None and not getattr(p, "_reported", False):
                    say(f"{name} exited with {p.returncode}")
                    p._reported = True  # type: ignore[attr-defined]
            time.sleep(0.5)
    except NodeError as e:
        say(str(e))
    finally:
        # All at once, the node's users first; whatever has not gone in 5 s is killed (and
        # LocalNode.down kills what is left in the node's cgroups: pods, shims).
        for name in reversed(list(procs)):
            if procs[name].poll() is None:
                procs[name].terminate()
        deadline = time.monotonic() + 5
        for p in procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        say("stopped")
    return 0


def _wait_for(
    ok: Callable[[], bool],
    timeout: float,
    what: str,
    procs: dict[str, subprocess.Popen[bytes]],
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        for name, p in procs.items():
            if p.poll() is not None:
                raise NodeError(f"{name} exited with {p.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise NodeError(f"no {what} within {timeout:.0f}s")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "supervise":
        sys.exit(supervise(Path(sys.argv[2])))
    print("internal: python -m pcipt.devcluster.node supervise STATE_DIR", file=sys.stderr)
    sys.exit(2)
