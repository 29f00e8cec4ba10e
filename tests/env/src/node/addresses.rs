//! Pod IP addresses.
//!
//! The API server rejects loopback addresses (127.0.0.0/8) in Endpoints and EndpointSlices
//! (`ValidateEndpointIP`), so pods on 127.0.0.N could never back a Service. Instead each
//! pod gets an address from a /24 in 198.18.0.0/15 (reserved for benchmarking, RFC 2544),
//! added to the `lo` interface as a /32 while the pod lives: it is local to this machine
//! like loopback, the API server can proxy and call webhooks there, and nothing leaves the
//! host. Each cluster picks a /24 no other cluster on the machine is using.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::Context as _;
use tokio::process::Command;

const FIRST_HOST: u8 = 2;
const LAST_HOST: u8 = 250;

/// Allocates pod addresses and keeps them on `lo` while in use.
#[derive(Debug)]
pub struct PodAddresses {
    prefix: [u8; 3],
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_use: BTreeSet<u8>,
    /// Round-robin cursor: a released address is reused as late as possible, so a stale
    /// endpoint never points at a new pod.
    next: u8,
}

impl PodAddresses {
    /// Picks a /24 in 198.18.0.0/15 with no address on `lo` yet.
    pub async fn new() -> anyhow::Result<Self> {
        let output = Command::new("ip")
            .args(["-4", "-o", "addr", "show", "dev", "lo"])
            .output()
            .await
            .context("running `ip addr show dev lo`")?;
        anyhow::ensure!(
            output.status.success(),
            "`ip addr show dev lo` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let listing = String::from_utf8_lossy(&output.stdout);
        // The last /24 (198.19.255.0/24) is the Service range (cluster::SERVICE_CIDR).
        let start = fastrand::u16(0..511);
        for offset in 0..511u16 {
            let n = (start + offset) % 511;
            let prefix = [198, 18 + u8::from(n >= 256), (n % 256) as u8];
            let needle = format!(" {}.{}.{}.", prefix[0], prefix[1], prefix[2]);
            if !listing.contains(&needle) {
                return Ok(Self {
                    prefix,
                    state: Mutex::new(State {
                        in_use: BTreeSet::new(),
                        next: FIRST_HOST,
                    }),
                });
            }
        }
        anyhow::bail!("no free /24 left in 198.18.0.0/15 on lo")
    }

    /// The pod subnet, for documentation and logs.
    pub fn subnet(&self) -> String {
        format!(
            "{}.{}.{}.0/24",
            self.prefix[0], self.prefix[1], self.prefix[2]
        )
    }

    /// Takes a free address and adds it to `lo`.
    pub async fn allocate(&self) -> anyhow::Result<Ipv4Addr> {
        let host = {
            let mut state = self
                .state
                .lock()
                .map_err(|_| anyhow::anyhow!("address allocator poisoned"))?;
            let mut found = None;
            for _ in FIRST_HOST..=LAST_HOST {
                let candidate = state.next;
                state.next = if candidate >= LAST_HOST {
                    FIRST_HOST
                } else {
                    candidate + 1
                };
                if !state.in_use.contains(&candidate) {
                    found = Some(candidate);
                    break;
                }
            }
            let host = found.context("all pod addresses are in use")?;
            state.in_use.insert(host);
            host
        };
        let address = self.address(host);
        if let Err(e) = ip_addr("add", address).await {
            self.forget(host);
            return Err(e);
        }
        Ok(address)
    }

    /// Removes the address from `lo` and makes it available again.
    pub async fn release(&self, address: Ipv4Addr) {
        let [a, b, c, host] = address.octets();
        if [a, b, c] != self.prefix {
            return;
        }
        if let Err(e) = ip_addr("del", address).await {
            tracing::warn!(%address, error = %format!("{e:#}"), "could not remove pod address");
        }
        self.forget(host);
    }

    /// Removes every address still allocated.
    pub async fn release_all(&self) {
        let hosts: Vec<u8> = match self.state.lock() {
            Ok(state) => state.in_use.iter().copied().collect(),
            Err(_) => return,
        };
        for host in hosts {
            self.release(self.address(host)).await;
        }
    }

    fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], host)
    }

    fn forget(&self, host: u8) {
        if let Ok(mut state) = self.state.lock() {
            state.in_use.remove(&host);
        }
    }
}

async fn ip_addr(action: &str, address: Ipv4Addr) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(["addr", action, &format!("{address}/32"), "dev", "lo"])
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running `ip addr {action} {address}/32 dev lo`"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    // A leftover from an earlier, killed run is as good as a fresh one.
    if output.status.success() || (action == "add" && stderr.contains("File exists")) {
        return Ok(());
    }
    anyhow::bail!(
        "`ip addr {action} {address}/32 dev lo` failed: {}",
        stderr.trim()
    )
}
