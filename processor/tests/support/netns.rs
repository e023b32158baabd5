//! Hosts of their own for nodes under test: a Linux bridge in this namespace and a network
//! namespace per node, joined to it by a veth pair (`ip`, from iproute2, as root). The broker
//! listens on the bridge's address; node i gets an address of its own. Links can then be cut
//! for real: between two nodes (a blackhole route each way, both still reaching the broker),
//! or a node's whole link (its veth down: no broker, no peer, no client outside).

use std::path::Path;
use std::process::Command;

/// A bridge and `nodes` namespaces on it, removed when dropped.
pub struct Network {
    /// Unique to this test process: interface and namespace names, and the subnet.
    tag: u32,
    nodes: u16,
}

impl Network {
    /// Builds the bridge and the namespaces. Fails loudly where `ip netns` cannot be used (not
    /// root, no iproute2): these tests need real links to cut.
    pub fn new(nodes: u16) -> Self {
        assert!((1..=20).contains(&nodes), "1..=20 nodes");
        let tag = std::process::id() % 10_000;
        let network = Self { tag, nodes };
        // A run killed before its drop left these behind under the same tag: start clean.
        network.remove();
        let bridge = network.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}/24", network.gateway()),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 1..=nodes {
            let ns = network.namespace(i);
            let veth = network.veth(i);
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &bridge, "up"]);
            let address = format!("{}/24", network.address(i));
            ip(&["-n", &ns, "addr", "add", &address, "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
        }
        network
    }

    /// The bridge's address, in this namespace: where the broker listens and the test is.
    pub fn gateway(&self) -> String {
        format!("10.{}.{}.1", 200 + self.tag / 256 % 50, self.tag % 256)
    }

    /// Node `i`'s address (1-based).
    pub fn address(&self, i: u16) -> String {
        format!(
            "10.{}.{}.{}",
            200 + self.tag / 256 % 50,
            self.tag % 256,
            1 + i
        )
    }

    /// `program` to be run in node `i`'s namespace.
    pub fn command(&self, i: u16, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(i)])
            .arg(program);
        command
    }

    /// Cuts the link between nodes `a` and `b` both ways; both keep reaching the broker.
    pub fn cut(&self, a: u16, b: u16) {
        self.routes("add", a, b);
    }

    /// Undoes [`Network::cut`].
    pub fn heal(&self, a: u16, b: u16) {
        self.routes("del", a, b);
    }

    /// Takes node `i` off the network: no broker, no peer, no client outside its namespace.
    pub fn isolate(&self, i: u16) {
        ip(&["link", "set", &self.veth(i), "down"]);
    }

    /// Undoes [`Network::isolate`].
    pub fn reconnect(&self, i: u16) {
        ip(&["link", "set", &self.veth(i), "up"]);
    }

    fn routes(&self, verb: &str, a: u16, b: u16) {
        for (from, to) in [(a, b), (b, a)] {
            let target = format!("{}/32", self.address(to));
            ip(&[
                "-n",
                &self.namespace(from),
                "route",
                verb,
                "blackhole",
                &target,
            ]);
        }
    }

    fn bridge(&self) -> String {
        format!("ksb{}", self.tag)
    }

    fn veth(&self, i: u16) -> String {
        format!("ksv{}n{i}", self.tag)
    }

    fn namespace(&self, i: u16) -> String {
        format!("ks{}-node{i}", self.tag)
    }

    /// Removes the namespaces (their veth ends go with them) and the bridge; quiet about what
    /// is not there.
    fn remove(&self) {
        for i in 1..=self.nodes {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.veth(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Runs `ip args`, failing the test with what it said.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `ip` ({e}): these tests need iproute2 and root (network namespaces)")
    });
    assert!(
        out.status.success(),
        "`ip {}` failed: {} (these tests need root for network namespaces)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
