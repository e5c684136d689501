//! An exclusive lock on a directory, held for a process's lifetime.
//!
//! Two controllers on one data directory would both hand out `job-1` and
//! lose each other's writes; two agents on one work directory would reap each
//! other's attempts. `flock(2)` on a `LOCK` file inside the directory is
//! released by the kernel however the holder ends (`kill -9` included), so a
//! restarted daemon never finds a stale lock. The holder's pid is written in
//! the file so the refusal can name it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Name of the lock file inside a locked directory.
pub const LOCK_FILE: &str = "LOCK";

/// The lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum DirLockError {
    /// Another live process holds it.
    #[error(
        "{dir} is in use by another {what} (pid {holder}); stop that one first, or give this one another directory"
    )]
    Held {
        /// The directory.
        dir: PathBuf,
        /// What kind of process uses such a directory (`controller`, `agent`).
        what: &'static str,
        /// The holder's pid as it wrote it (`unknown` if it could not be read).
        holder: String,
    },
    /// The lock file could not be opened or written.
    #[error("cannot lock {dir}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// Holds the lock until dropped (or the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir` (which must exist) without waiting; `what` names the holder kind in errors.
    pub fn acquire(dir: &Path, what: &'static str) -> Result<DirLock, DirLockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| DirLockError::Io { dir: dir.to_path_buf(), source };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))
            .map_err(io)?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io(err));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "unknown".to_string() } else { holder.to_string() };
            return Err(DirLockError::Held { dir: dir.to_path_buf(), what, holder });
        }
        file.set_len(0).and_then(|()| file.rewind()).map_err(io)?;
        writeln!(file, "{}", std::process::id()).and_then(|()| file.sync_all()).map_err(io)?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder_and_granted_once_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "controller").unwrap();
        let err = DirLock::acquire(dir.path(), "controller").unwrap_err();
        let text = err.to_string();
        assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
        assert!(text.contains("another controller"), "{text}");
        drop(first);
        DirLock::acquire(dir.path(), "controller").expect("free again once dropped");
    }
}
