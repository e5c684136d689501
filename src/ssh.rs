//! The controller's SSH transport, plugged in: registered hosts
//! (`cosmos agents add ssh://…`) are reached with `cosmos-ssh`, and the
//! client commands that register and list them.

use crate::client::{Client, ClientArgs};
use cosmos_controller::hosts::{HostDialer, HostEntry, HostView};
use cosmos_proto::BoxStream;
use std::path::PathBuf;

/// Where a host's agent listens when `agents add` names neither `--socket` nor `--port`.
pub const AGENT_SOCKET_DEFAULT: &str = "/run/cosmos/agent.sock";

/// The controller-wide SSH settings (`cosmos controller --known-hosts …`).
#[derive(Clone, Debug)]
pub struct SshDialer {
    /// The `known_hosts` file host keys are checked against.
    pub known_hosts: PathBuf,
    /// The `ssh_config` read; none: `~/.ssh/config` when it exists.
    pub ssh_config: Option<PathBuf>,
    /// Silence before an SSH keepalive, in ms.
    pub keepalive_interval_ms: u64,
    /// Keepalives unanswered before the link counts as dead.
    pub keepalive_max: usize,
}

impl SshDialer {
    fn options(&self, entry: &HostEntry) -> Result<(cosmos_ssh::Target, cosmos_ssh::Options), String> {
        let target = cosmos_ssh::Target::parse(&entry.url)?;
        let agent = match (entry.port, &entry.socket) {
            (Some(port), None) => cosmos_ssh::AgentEndpoint::Port(port),
            (None, socket) => {
                cosmos_ssh::AgentEndpoint::Socket(socket.clone().unwrap_or_else(|| AGENT_SOCKET_DEFAULT.into()))
            }
            (Some(_), Some(_)) => return Err("give the agent's --socket or its --port, not both".into()),
        };
        let mut opts = cosmos_ssh::Options::new(agent);
        opts.identity = entry.identity.clone();
        opts.passphrase_file = entry.passphrase_file.clone();
        opts.jump =
            entry.jump.as_deref().map(cosmos_ssh::Target::parse).transpose().map_err(|e| format!("--jump {e}"))?;
        opts.host_keys = if entry.accept_new_host_key {
            cosmos_ssh::HostKeyPolicy::AcceptNew
        } else {
            cosmos_ssh::HostKeyPolicy::Strict
        };
        opts.known_hosts = self.known_hosts.clone();
        opts.ssh_config = self.ssh_config.clone();
        opts.keepalive_interval_ms = self.keepalive_interval_ms;
        opts.keepalive_max = self.keepalive_max;
        Ok((target, opts))
    }
}

impl HostDialer for SshDialer {
    fn validate(&self, entry: &HostEntry) -> Result<String, String> {
        for path in [&entry.identity, &entry.passphrase_file].into_iter().flatten() {
            if !path.is_absolute() {
                return Err(format!("{} must be an absolute path: the controller reads it", path.display()));
            }
        }
        let (target, _) = self.options(entry)?;
        Ok(target.host)
    }

    fn open(&self, entry: &HostEntry) -> futures::future::BoxFuture<'static, Result<BoxStream, String>> {
        let prepared = self.options(entry);
        Box::pin(async move {
            let (target, opts) = prepared?;
            match cosmos_ssh::open(&target, &opts).await {
                Ok(stream) => Ok(Box::new(stream) as BoxStream),
                Err(e) => Err(format!("{target}: {e}")),
            }
        })
    }
}

/// `cosmos agents add ssh://USER@HOST[:PORT] …`.
pub fn add(args: &ClientArgs, entry: HostEntry) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let view: HostView = client.post("/v1/hosts", &entry)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        println!(
            "{}: registered ({}); the controller links to its agent now and keeps the link (see `cosmos agents hosts`)",
            view.name, view.entry.url
        );
    }
    Ok(())
}

/// `cosmos agents remove HOST`.
pub fn remove(args: &ClientArgs, host: &str) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let entry: HostEntry = client.delete(&format!("/v1/hosts/{host}"))?;
    println!("{host}: removed ({}); its link is closed", entry.url);
    Ok(())
}

/// `cosmos agents hosts`: the registered hosts and their links.
pub fn list(args: &ClientArgs) -> anyhow::Result<()> {
    let client = Client::new(args)?;
    let hosts: Vec<HostView> = client.get("/v1/hosts")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&hosts)?);
        return Ok(());
    }
    if hosts.is_empty() {
        println!("no hosts registered (cosmos agents add ssh://USER@HOST)");
    }
    for h in hosts {
        let agent = match (&h.entry.socket, h.entry.port) {
            (_, Some(p)) => format!("127.0.0.1:{p}"),
            (Some(s), None) => format!("unix:{s}"),
            (None, None) => format!("unix:{AGENT_SOCKET_DEFAULT}"),
        };
        let jump = h.entry.jump.as_deref().map(|j| format!(" via {j}")).unwrap_or_default();
        println!("{:<20} {:<11} {}{jump} -> {agent}", h.name, h.state, h.entry.url);
        if let Some(e) = &h.error {
            println!("{:<20} {}", "", crate::client::printable(e));
        }
    }
    Ok(())
}
