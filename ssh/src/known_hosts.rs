//! Host keys against OpenSSH's `known_hosts` format (sshd(8), "SSH_KNOWN_HOSTS
//! FILE FORMAT"): comma-separated host patterns (`*` and `?` wildcards, `!`
//! negation), hashed names (`|1|salt|hmac-sha1`), `[host]:port` for ports
//! other than 22, several keys per host, `@revoked` and `@cert-authority`
//! markers, comments and blank lines. Every answer names the file and line,
//! so an operator can fix exactly that line.
//!
//! russh ships a checker too, but it splits on single spaces, reads no
//! markers or wildcards, and fails the whole file on one bad key; OpenSSH's
//! own files have all of these.

use hmac::{Hmac, KeyInit, Mac};
use russh::keys::PublicKey;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What the file says of a host's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The key is recorded for the host.
    Known,
    /// The host has no key of this type recorded; `other_types` lists
    /// the types it does have (with their lines), if any.
    Unknown {
        /// Recorded keys of other algorithms: (algorithm, line).
        other_types: Vec<(String, usize)>,
    },
    /// A different key of the same type is recorded: the host key changed
    /// (or someone is in the middle).
    Changed {
        /// The first line recording the other key.
        line: usize,
    },
    /// The key is marked `@revoked`.
    Revoked {
        /// The line.
        line: usize,
    },
}

/// The name a host is recorded under: `host`, or `[host]:port` off port 22.
pub fn host_port_name(host: &str, port: u16) -> String {
    if port == 22 { host.to_string() } else { format!("[{host}]:{port}") }
}

/// Checks `key` for `host`:`port` against the file at `path` (a missing file knows no host).
pub fn check(path: &Path, host: &str, port: u16, key: &PublicKey) -> std::io::Result<Verdict> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    Ok(check_text(&text, &host_port_name(host, port), key))
}

/// Algorithms recorded for the host, in file order: the client offers these
/// first, as OpenSSH does, so a known host is asked for the key type on file.
pub fn recorded_algorithms(path: &Path, host: &str, port: u16) -> Vec<russh::keys::Algorithm> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let name = host_port_name(host, port);
    let mut out = Vec::new();
    for entry in entries(&text) {
        if entry.marker.is_none()
            && host_matches(&name, entry.hosts)
            && let Ok(k) = russh::keys::parse_public_key_base64(entry.key_base64)
        {
            let alg = k.algorithm();
            if !out.contains(&alg) {
                out.push(alg);
            }
        }
    }
    out
}

fn check_text(text: &str, name: &str, key: &PublicKey) -> Verdict {
    let mut changed = None;
    let mut known = false;
    let mut other_types = Vec::new();
    for entry in entries(text) {
        if !host_matches(name, entry.hosts) {
            continue;
        }
        // A key that does not parse is someone else's line gone bad, not a verdict on this host.
        let Ok(recorded) = russh::keys::parse_public_key_base64(entry.key_base64) else { continue };
        match entry.marker {
            Some("@revoked") if recorded.key_data() == key.key_data() => return Verdict::Revoked { line: entry.line },
            Some(_) => continue,
            None => {}
        }
        if recorded.key_data() == key.key_data() {
            known = true;
        } else if recorded.algorithm() == key.algorithm() {
            changed.get_or_insert(entry.line);
        } else {
            other_types.push((recorded.algorithm().to_string(), entry.line));
        }
    }
    match (known, changed) {
        (true, _) => Verdict::Known,
        (false, Some(line)) => Verdict::Changed { line },
        (false, None) => Verdict::Unknown { other_types },
    }
}

struct Entry<'a> {
    line: usize,
    marker: Option<&'a str>,
    hosts: &'a str,
    key_base64: &'a str,
}

fn entries(text: &str) -> impl Iterator<Item = Entry<'_>> {
    text.lines().enumerate().filter_map(|(i, raw)| {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let mut fields = line.split_whitespace();
        let mut first = fields.next()?;
        let marker = if first.starts_with('@') {
            let m = first;
            first = fields.next()?;
            Some(m)
        } else {
            None
        };
        let _key_type = fields.next()?;
        let key_base64 = fields.next()?;
        Some(Entry { line: i + 1, marker, hosts: first, key_base64 })
    })
}

/// Whether `name` matches a comma-separated pattern list: some positive
/// pattern matches and no negated one does.
fn host_matches(name: &str, patterns: &str) -> bool {
    let mut matched = false;
    for p in patterns.split(',') {
        if let Some(hashed) = p.strip_prefix("|1|") {
            if hashed_matches(name, hashed) {
                matched = true;
            }
        } else if let Some(negated) = p.strip_prefix('!') {
            if glob(negated, name) {
                return false;
            }
        } else if glob(p, name) {
            matched = true;
        }
    }
    matched
}

fn hashed_matches(name: &str, salt_and_hash: &str) -> bool {
    use data_encoding::BASE64;
    let Some((salt, hash)) = salt_and_hash.split_once('|') else { return false };
    let (Ok(salt), Ok(hash)) = (BASE64.decode(salt.as_bytes()), BASE64.decode(hash.as_bytes())) else {
        return false;
    };
    let Ok(mac) = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(&salt) else { return false };
    mac.chain_update(name.as_bytes()).verify_slice(&hash).is_ok()
}

/// OpenSSH's `match_pattern`: `*` any run, `?` one character, case-insensitive as host names are.
fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) =
        (pattern.to_ascii_lowercase().chars().collect(), name.to_ascii_lowercase().chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Appends `host`'s key to the file (accept-new), creating it and its directory
/// (mode 0700) if needed. Returns the line written, for the log.
pub fn learn(path: &Path, host: &str, port: u16, key: &PublicKey) -> std::io::Result<usize> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    let existing = std::fs::read_to_string(path).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
    let mut line = keyscan_line(host, port, key);
    if !existing.is_empty() && !existing.ends_with('\n') {
        line.insert(0, '\n');
    }
    line.push('\n');
    f.write_all(line.as_bytes())?;
    f.sync_all()?;
    Ok(existing.lines().count() + 1)
}

/// The line `ssh-keyscan -p PORT HOST` prints for the key: what to add to known_hosts to trust it.
pub fn keyscan_line(host: &str, port: u16, key: &PublicKey) -> String {
    let openssh = key.to_openssh().unwrap_or_else(|_| key.algorithm().to_string());
    // to_openssh appends the comment, if any; known_hosts lines carry none.
    let mut parts = openssh.split_whitespace();
    let (alg, data) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    format!("{} {alg} {data}", host_port_name(host, port))
}

/// The default file: `~/.ssh/known_hosts`.
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ssh").join("known_hosts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED_A: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    const ED_B: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIA6rWI3G1sz07DnfFlrouTcysQlj2P+jpNSOEWD9OJ3X";

    fn key(b64: &str) -> PublicKey {
        russh::keys::parse_public_key_base64(b64).unwrap()
    }

    #[test]
    fn plain_bracketed_wildcard_and_negated_patterns() {
        let text = format!(
            "# comment\n\n[gpu-1]:2222 ssh-ed25519 {ED_A}\ngpu-2,10.0.0.2\tssh-ed25519  {ED_A} comment\n*.lab,!bad.lab ssh-ed25519 {ED_B}\n"
        );
        assert_eq!(check_text(&text, "[gpu-1]:2222", &key(ED_A)), Verdict::Known);
        assert_eq!(check_text(&text, "gpu-1", &key(ED_A)), Verdict::Unknown { other_types: vec![] });
        assert_eq!(check_text(&text, "10.0.0.2", &key(ED_A)), Verdict::Known);
        assert_eq!(check_text(&text, "gpu-2", &key(ED_B)), Verdict::Changed { line: 4 });
        assert_eq!(check_text(&text, "x.lab", &key(ED_B)), Verdict::Known);
        assert_eq!(check_text(&text, "bad.lab", &key(ED_B)), Verdict::Unknown { other_types: vec![] });
    }

    #[test]
    fn hashed_names_match_as_ssh_keygen_writes_them() {
        // `ssh-keygen -H` form of "example.com" (from russh's own test data).
        let text = format!("|1|O33ESRMWPVkMYIwJ1Uw+n877jTo=|nuuC5vEqXlEZ/8BXQR7m619W6Ak= ssh-ed25519 {ED_A}\n");
        let hashed_key = "AAAAC3NzaC1lZDI1NTE5AAAAILIG2T/B0l0gaqj3puu510tu9N1OkQ4znY3LYuEm5zCF";
        let text = text.replace(ED_A, hashed_key);
        assert_eq!(check_text(&text, "example.com", &key(hashed_key)), Verdict::Known);
        assert_eq!(check_text(&text, "example.org", &key(hashed_key)), Verdict::Unknown { other_types: vec![] });
    }

    #[test]
    fn several_keys_per_host_revoked_and_broken_lines() {
        let text = format!(
            "h ssh-ed25519 {ED_B}\nh ssh-ed25519 {ED_A}\n@revoked * ssh-ed25519 {ED_B}\nh ssh-ed25519 not-base64\n"
        );
        assert_eq!(check_text(&text, "h", &key(ED_A)), Verdict::Known);
        assert_eq!(check_text(&text, "h", &key(ED_B)), Verdict::Revoked { line: 3 });
    }

    #[test]
    fn learning_appends_a_line_that_then_checks_known() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh").join("known_hosts");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, format!("other ssh-ed25519 {ED_B}")).unwrap();
        assert_eq!(learn(&path, "gpu-1", 2222, &key(ED_A)).unwrap(), 2);
        assert_eq!(check(&path, "gpu-1", 2222, &key(ED_A)).unwrap(), Verdict::Known);
        assert_eq!(check(&path, "other", 22, &key(ED_B)).unwrap(), Verdict::Known);
        assert_eq!(keyscan_line("gpu-1", 22, &key(ED_A)), format!("gpu-1 ssh-ed25519 {ED_A}"));
    }

    #[test]
    fn globs_follow_openssh() {
        assert!(glob("*", "anything"));
        assert!(glob("gpu-?", "GPU-3"));
        assert!(!glob("gpu-?", "gpu-33"));
        assert!(glob("*.lab.example", "a.b.lab.example"));
        assert!(!glob("*.lab", "lab"));
    }
}
