//! What `~/.ssh/config` says of a host (through the `ssh2-config` parser):
//! `HostName`, `User`, `Port`, `IdentityFile` and `ProxyJump`. What the
//! operator gave explicitly (`ssh://USER@HOST:PORT`, `--identity`, `--jump`)
//! wins over the file, as on OpenSSH's command line.

use crate::{Options, SshError, Target};
use std::path::PathBuf;

/// A host after `ssh_config`: what to connect to, as whom, with which keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    /// The name or address connected to (and checked in known_hosts).
    pub host_name: String,
    /// The port.
    pub port: u16,
    /// The login user.
    pub user: String,
    /// Key files to offer, in order.
    pub identities: Vec<PathBuf>,
    /// The bastion to go through, if any.
    pub jump: Option<Target>,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

fn expand_tilde(p: &std::path::Path) -> PathBuf {
    match (p.strip_prefix("~"), home()) {
        (Ok(rest), Some(h)) => h.join(rest),
        _ => p.to_path_buf(),
    }
}

/// Resolves `target` through the ssh config in `opts` (or `~/.ssh/config` when it exists).
pub fn resolve(target: &Target, opts: &Options) -> Result<Resolved, SshError> {
    let path = opts.ssh_config.clone().or_else(|| home().map(|h| h.join(".ssh").join("config")));
    let params = match path {
        Some(path) if opts.ssh_config.is_some() || path.exists() => {
            let fail = |reason: String| SshError::Config { path: path.clone(), reason };
            let file = std::fs::File::open(&path).map_err(|e| fail(e.to_string()))?;
            let mut reader = std::io::BufReader::new(file);
            let rules = ssh2_config::ParseRule::ALLOW_UNKNOWN_FIELDS | ssh2_config::ParseRule::ALLOW_UNSUPPORTED_FIELDS;
            let config =
                ssh2_config::SshConfig::default().parse(&mut reader, rules).map_err(|e| fail(e.to_string()))?;
            Some(config.query(&target.host))
        }
        _ => None,
    };
    let host_name = params.as_ref().and_then(|p| p.host_name.clone()).unwrap_or_else(|| target.host.clone());
    let port = target.port.or_else(|| params.as_ref().and_then(|p| p.port)).unwrap_or(22);
    let user = target
        .user
        .clone()
        .or_else(|| params.as_ref().and_then(|p| p.user.clone()))
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".into());
    let mut identities: Vec<PathBuf> = opts.identity.iter().cloned().collect();
    for f in params.as_ref().and_then(|p| p.identity_file.clone()).unwrap_or_default() {
        let f = expand_tilde(&f);
        if !identities.contains(&f) {
            identities.push(f);
        }
    }
    if identities.is_empty() {
        // OpenSSH's defaults, those that exist.
        if let Some(h) = home() {
            for name in ["id_ed25519", "id_ecdsa", "id_rsa"] {
                let p = h.join(".ssh").join(name);
                if p.exists() {
                    identities.push(p);
                }
            }
        }
    }
    let jump = match &opts.jump {
        Some(j) => Some(j.clone()),
        None => match params.as_ref().and_then(|p| p.proxy_jump.clone()).and_then(|j| j.into_iter().next()) {
            Some(j) if j.eq_ignore_ascii_case("none") => None,
            Some(j) => {
                // ProxyJump is `[user@]host[:port]`; only the first hop is taken.
                let with_scheme = if j.starts_with("ssh://") { j.clone() } else { format!("ssh://{j}") };
                Some(Target::parse(&with_scheme).map_err(|reason| SshError::Config {
                    path: opts.ssh_config.clone().unwrap_or_else(|| PathBuf::from("~/.ssh/config")),
                    reason: format!("ProxyJump for {}: {reason}", target.host),
                })?)
            }
            None => None,
        },
    };
    Ok(Resolved { host_name, port, user, identities, jump })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AgentEndpoint;

    #[test]
    fn the_config_fills_what_the_url_leaves_out_and_the_url_wins() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("config");
        std::fs::write(
            &cfg,
            "Host gpu-*\n  User ops\n  Port 2222\n  IdentityFile /keys/gpu\n  ProxyJump jump@bastion:2200\n\nHost gpu-3\n  HostName 10.0.0.3\n",
        )
        .unwrap();
        let mut opts = Options::new(AgentEndpoint::Socket("/run/cosmos/agent.sock".into()));
        opts.ssh_config = Some(cfg);
        let r = resolve(&Target::parse("ssh://gpu-3").unwrap(), &opts).unwrap();
        assert_eq!(r.host_name, "10.0.0.3");
        assert_eq!((r.user.as_str(), r.port), ("ops", 2222));
        assert_eq!(r.identities, vec![PathBuf::from("/keys/gpu")]);
        assert_eq!(r.jump, Some(Target { user: Some("jump".into()), host: "bastion".into(), port: Some(2200) }));
        opts.identity = Some("/keys/mine".into());
        opts.jump = Some(Target::parse("ssh://b2").unwrap());
        let r = resolve(&Target::parse("ssh://root@gpu-3:22").unwrap(), &opts).unwrap();
        assert_eq!((r.user.as_str(), r.port), ("root", 22));
        assert_eq!(r.identities, vec![PathBuf::from("/keys/mine"), PathBuf::from("/keys/gpu")]);
        assert_eq!(r.jump.unwrap().host, "b2");
    }

    #[test]
    fn an_unreadable_config_is_named() {
        let mut opts = Options::new(AgentEndpoint::Port(7702));
        opts.ssh_config = Some("/no/such/ssh_config".into());
        let e = resolve(&Target::parse("ssh://h").unwrap(), &opts).unwrap_err().to_string();
        assert!(e.contains("/no/such/ssh_config"), "{e}");
    }
}
