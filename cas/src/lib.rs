//! A content-addressed file store: every blob lives under its sha256.
//!
//! The controller keeps prompts' videos and runs' outputs in one; every agent
//! keeps one as its per-host cache. Blobs enter only through a temporary or
//! partial file that is hashed and verified before it is renamed into place,
//! so a blob's path always holds exactly the bytes its name promises (unless
//! someone writes to it behind the store's back: [`Store::verify`] checks).
//!
//! Layout under the root: `sha256/<first two hex>/<hex>` (final blobs, mode
//! 0444), `partial/<hex>` (transfers in progress, resumable by length),
//! `tmp/` (uploads of unknown digest).

use cosmos_proto::Sha256;
use sha2::Digest;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Buffer size for streaming copies and hashing.
pub const COPY_BUFFER_BYTES: usize = 1 << 20;
/// Partial transfers untouched this long are removed when a store opens: whoever
/// started them has long given up, and a resume would only save their bytes.
pub const PARTIAL_AGE_MAX: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// The filesystem refused (full disk, permissions).
    #[error("{context} {path}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The bytes do not hash to the digest they were announced as.
    #[error("content does not match its digest: expected {expected}, got {actual} ({size_bytes} bytes)")]
    DigestMismatch {
        /// The digest promised.
        expected: Sha256,
        /// The digest of what arrived.
        actual: Sha256,
        /// Bytes that arrived.
        size_bytes: u64,
    },
    /// A partial transfer grew past the size it was announced with.
    #[error("blob {sha256} is announced as {expected_bytes} bytes but {actual_bytes} arrived")]
    SizeMismatch {
        /// Which blob.
        sha256: Sha256,
        /// Announced size.
        expected_bytes: u64,
        /// What is on disk.
        actual_bytes: u64,
    },
}

impl cosmos_proto::Classify for CasError {
    /// Whether trying again could succeed: a mismatch means the data must be fetched again
    /// (retryable too), an I/O error may be a full disk that an operator frees.
    fn retry(&self) -> cosmos_proto::Retry {
        cosmos_proto::Retry::when(true)
    }
}

type Result<T> = std::result::Result<T, CasError>;

fn io_err<'a>(context: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CasError + 'a {
    move |source| CasError::Io { context, path: path.to_path_buf(), source }
}

/// A content-addressed store rooted at one directory.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// Makes temporary names unique within this process.
    tmp_seq: AtomicU64,
}

impl Store {
    /// Opens (creating) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for sub in ["sha256", "partial", "tmp"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err("cannot create", &dir))?;
        }
        // Temporary files of a previous process are never resumed: their digest is unknown.
        if let Ok(entries) = fs::read_dir(root.join("tmp")) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        Store::expire_partials(&root.join("partial"), PARTIAL_AGE_MAX);
        Ok(Store { root, tmp_seq: AtomicU64::new(0) })
    }

    /// Removes partial files last written more than `max_age` ago.
    fn expire_partials(dir: &Path, max_age: std::time::Duration) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let modified = e.metadata().and_then(|m| m.modified());
            let old = modified.is_ok_and(|t| t.elapsed().is_ok_and(|age| age > max_age));
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob lives once complete (whether or not it is there).
    pub fn path(&self, sha256: &Sha256) -> PathBuf {
        let hex = sha256.to_string();
        self.root.join("sha256").join(&hex[..2]).join(hex)
    }

    /// Where a transfer of the blob in progress accumulates.
    pub fn partial_path(&self, sha256: &Sha256) -> PathBuf {
        self.root.join("partial").join(sha256.to_string())
    }

    /// The blob's size, when the store holds it complete.
    pub fn size(&self, sha256: &Sha256) -> Option<u64> {
        fs::metadata(self.path(sha256)).ok().filter(|m| m.is_file()).map(|m| m.len())
    }

    /// Bytes of a partial transfer already on disk (0 when none), so a transfer resumes there.
    pub fn partial_len(&self, sha256: &Sha256) -> u64 {
        fs::metadata(self.partial_path(sha256)).map_or(0, |m| m.len())
    }

    /// Appends `data` at `offset` of the blob's partial file. Only appends at
    /// the current end are accepted; anything else returns the current length
    /// unchanged, which is where the sender must resume.
    pub fn append_partial(&self, sha256: &Sha256, offset: u64, data: &[u8]) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        let path = self.partial_path(sha256);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        let len = file.metadata().map_err(io_err("cannot stat", &path))?.len();
        if offset != len {
            return Ok(len);
        }
        // Positional, not O_APPEND: two receivers of the same blob (two connections) that both
        // saw this length write the same bytes at the same place instead of appending them twice.
        file.write_all_at(data, offset).map_err(io_err("cannot write", &path))?;
        Ok(len + data.len() as u64)
    }

    /// Reads `len_bytes` at `offset` of a complete blob (fewer at its end).
    pub fn read_at(&self, sha256: &Sha256, offset: u64, len_bytes: usize) -> Result<Vec<u8>> {
        let path = self.path(sha256);
        let file = File::open(&path).map_err(io_err("cannot open", &path))?;
        read_range(&file, offset, len_bytes).map_err(io_err("cannot read", &path))
    }

    /// Drops a partial transfer (e.g. after its content failed verification).
    pub fn discard_partial(&self, sha256: &Sha256) {
        let _ = fs::remove_file(self.partial_path(sha256));
    }

    /// Verifies the complete partial file against its digest and moves it into
    /// place. On a mismatch the partial file is removed, so the next try starts over.
    pub fn commit_partial(&self, sha256: &Sha256, size_bytes: u64) -> Result<PathBuf> {
        let partial = self.partial_path(sha256);
        let len = fs::metadata(&partial).map_err(io_err("cannot stat", &partial))?.len();
        if len != size_bytes {
            if len > size_bytes {
                self.discard_partial(sha256);
            }
            return Err(CasError::SizeMismatch { sha256: *sha256, expected_bytes: size_bytes, actual_bytes: len });
        }
        let (actual, _) = hash_file(&partial).map_err(io_err("cannot read", &partial))?;
        if actual != *sha256 {
            self.discard_partial(sha256);
            return Err(CasError::DigestMismatch { expected: *sha256, actual, size_bytes: len });
        }
        self.install(&partial, sha256)
    }

    /// Opens the blob's partial file for sequential appends from byte `start`,
    /// with the blob's running digest over its first `start` bytes (read now),
    /// so the whole-blob digest is known the moment the last byte is written:
    /// no second read of the file. The hasher may be fed on another thread than
    /// the writer. Fails when the partial file holds fewer than `start` bytes.
    pub fn partial_writer(&self, sha256: &Sha256, start: u64) -> Result<(PartialWriter, BlobHasher)> {
        let path = self.partial_path(sha256);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err("cannot open", &path))?;
        let mut hasher = BlobHasher { hasher: sha2::Sha256::new(), len: 0 };
        hasher.len = hash_prefix(&file, start, &mut hasher.hasher).map_err(io_err("cannot read", &path))?;
        if hasher.len != start {
            return Err(CasError::SizeMismatch { sha256: *sha256, expected_bytes: start, actual_bytes: hasher.len });
        }
        Ok((PartialWriter { sha256: *sha256, path, file, len: start }, hasher))
    }

    /// Checks a finished partial file (`size_bytes` written, hashing to its
    /// digest) and moves it into the store. On a digest mismatch the partial
    /// file is removed, so the next try starts over.
    pub fn commit_written(&self, writer: PartialWriter, hasher: BlobHasher, size_bytes: u64) -> Result<PathBuf> {
        let PartialWriter { sha256, path, file, len } = writer;
        let on_disk = file.metadata().map_err(io_err("cannot stat", &path))?.len();
        drop(file);
        if let Some(actual_bytes) = [len, hasher.len, on_disk].into_iter().find(|&n| n != size_bytes) {
            if on_disk > size_bytes {
                self.discard_partial(&sha256);
            }
            return Err(CasError::SizeMismatch { sha256, expected_bytes: size_bytes, actual_bytes });
        }
        let actual = hasher.finish();
        if actual != sha256 {
            self.discard_partial(&sha256);
            return Err(CasError::DigestMismatch { expected: sha256, actual, size_bytes });
        }
        self.install(&path, &sha256)
    }

    /// Stores everything `reader` yields; when `expected` is given the content
    /// must hash to it, else nothing is stored.
    pub fn put_reader(&self, mut reader: impl Read, expected: Option<&Sha256>) -> Result<(Sha256, u64)> {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join("tmp").join(format!("{}-{seq}", std::process::id()));
        let result = (|| {
            let mut file = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
            let mut hasher = sha2::Sha256::new();
            let mut buf = vec![0u8; COPY_BUFFER_BYTES];
            let mut size = 0u64;
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(CasError::Io {
                            context: "cannot read the upload for",
                            path: tmp.clone(),
                            source: e,
                        });
                    }
                };
                hasher.update(&buf[..n]);
                file.write_all(&buf[..n]).map_err(io_err("cannot write", &tmp))?;
                size += n as u64;
            }
            let actual = Sha256(hasher.finalize().into());
            if let Some(expected) = expected {
                if *expected != actual {
                    return Err(CasError::DigestMismatch { expected: *expected, actual, size_bytes: size });
                }
            }
            self.install(&tmp, &actual)?;
            Ok((actual, size))
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    /// Stores a byte string.
    pub fn put_bytes(&self, data: &[u8]) -> Result<(Sha256, u64)> {
        self.put_reader(data, None)
    }

    /// Re-hashes a stored blob; a blob changed behind the store's back is removed.
    pub fn verify(&self, sha256: &Sha256) -> Result<bool> {
        let path = self.path(sha256);
        match hash_file(&path) {
            Ok((actual, _)) if actual == *sha256 => Ok(true),
            Ok(_) => {
                let _ = fs::remove_file(&path);
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(CasError::Io { context: "cannot read", path, source: e }),
        }
    }

    /// Makes the blob appear at `dest` (a hard link when possible, else a copy),
    /// creating parent directories. Links share the inode: the blob is read-only,
    /// and [`Store::verify`] catches a job that wrote through it anyway.
    pub fn place(&self, sha256: &Sha256, dest: &Path) -> Result<()> {
        let src = self.path(sha256);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
        }
        let _ = fs::remove_file(dest);
        if fs::hard_link(&src, dest).is_ok() {
            return Ok(());
        }
        fs::copy(&src, dest).map_err(io_err("cannot copy into", dest))?;
        Ok(())
    }

    /// Moves a verified file into its final place, read-only.
    fn install(&self, from: &Path, sha256: &Sha256) -> Result<PathBuf> {
        let dest = self.path(sha256);
        let parent = dest.parent().expect("blob paths have a parent");
        fs::create_dir_all(parent).map_err(io_err("cannot create", parent))?;
        let _ = fs::set_permissions(from, fs::Permissions::from_mode(0o444));
        // A concurrent store of the same content wins harmlessly: both are the same bytes.
        fs::rename(from, &dest).map_err(io_err("cannot move into the store", &dest))?;
        Ok(dest)
    }
}

/// A partial transfer being appended to in order (see [`Store::partial_writer`]).
/// The file stays open between appends.
#[derive(Debug)]
pub struct PartialWriter {
    sha256: Sha256,
    path: PathBuf,
    file: File,
    len: u64,
}

impl PartialWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data` at the current end; returns the new length.
    pub fn append(&mut self, data: &[u8]) -> Result<u64> {
        use std::os::unix::fs::FileExt;
        // Positional: a stale writer of the same blob (an aborted download still
        // draining) can only write the same bytes at the same places.
        self.file.write_all_at(data, self.len).map_err(io_err("cannot write", &self.path))?;
        self.len += data.len() as u64;
        Ok(self.len)
    }
}

/// A blob's running sha256, fed in order with what is appended to its partial file.
#[derive(Clone, Debug)]
pub struct BlobHasher {
    hasher: sha2::Sha256,
    len: u64,
}

impl BlobHasher {
    /// Hashes the next bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.len += data.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing is hashed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn finish(self) -> Sha256 {
        Sha256(self.hasher.finalize().into())
    }
}

/// Feeds the first `len` bytes of `file` to `hasher`; returns how many there were.
fn hash_prefix(file: &File, len: u64, hasher: &mut sha2::Sha256) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; COPY_BUFFER_BYTES.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let want = buf.len().min((len - done) as usize);
        match file.read_at(&mut buf[..want], done) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                done += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// SHA-256 and size of a file, read in large blocks.
pub fn hash_file(path: &Path) -> io::Result<(Sha256, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((Sha256(hasher.finalize().into()), size))
}

/// Reads up to `len_bytes` at `offset` of an open file (fewer at its end), by position,
/// so one open file serves any number of ranges without seeking.
pub fn read_range(file: &File, offset: u64, len_bytes: usize) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len_bytes];
    let mut filled = 0;
    while filled < len_bytes {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// SHA-256 of a byte string.
pub fn digest(data: &[u8]) -> Sha256 {
    Sha256(sha2::Sha256::digest(data).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_is_stored_under_its_digest_and_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (sha, size) = store.put_bytes(b"hello").unwrap();
        assert_eq!(sha, digest(b"hello"));
        assert_eq!(size, 5);
        assert_eq!(store.size(&sha), Some(5));
        assert_eq!(fs::read(store.path(&sha)).unwrap(), b"hello");
        assert_eq!(fs::metadata(store.path(&sha)).unwrap().permissions().mode() & 0o777, 0o444);
    }

    #[test]
    fn a_wrong_digest_stores_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let wrong = digest(b"other");
        let err = store.put_reader(&b"hello"[..], Some(&wrong)).unwrap_err();
        assert!(matches!(err, CasError::DigestMismatch { .. }), "{err}");
        assert_eq!(store.size(&wrong), None);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn partial_transfers_append_only_at_their_end_and_verify_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = b"0123456789";
        let sha = digest(data);
        assert_eq!(store.append_partial(&sha, 0, &data[..4]).unwrap(), 4);
        // A resend of an old chunk or a gap changes nothing and says where to resume.
        assert_eq!(store.append_partial(&sha, 0, &data[..4]).unwrap(), 4);
        assert_eq!(store.append_partial(&sha, 6, &data[6..]).unwrap(), 4);
        assert_eq!(store.partial_len(&sha), 4);
        assert!(matches!(store.commit_partial(&sha, 10), Err(CasError::SizeMismatch { .. })));
        assert_eq!(store.append_partial(&sha, 4, &data[4..]).unwrap(), 10);
        let path = store.commit_partial(&sha, 10).unwrap();
        assert_eq!(fs::read(path).unwrap(), data);
        assert_eq!(store.partial_len(&sha), 0);
        assert_eq!(store.read_at(&sha, 8, 100).unwrap(), b"89");
    }

    #[test]
    fn a_partial_writer_resumes_hashing_what_is_there_and_commits_without_rereading() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = b"0123456789";
        let sha = digest(data);
        let (mut w, _) = store.partial_writer(&sha, 0).unwrap();
        assert_eq!(w.append(&data[..3]).unwrap(), 3);
        drop(w);
        assert!(matches!(store.partial_writer(&sha, 4), Err(CasError::SizeMismatch { .. })));
        let (mut w, mut h) = store.partial_writer(&sha, 3).unwrap();
        assert_eq!(h.len(), 3);
        assert_eq!(w.append(&data[3..7]).unwrap(), 7);
        h.update(&data[3..7]);
        assert_eq!(store.partial_len(&sha), 7);
        assert!(matches!(store.commit_written(w, h.clone(), 10), Err(CasError::SizeMismatch { .. })));
        let (mut w, mut h) = store.partial_writer(&sha, 7).unwrap();
        assert_eq!(w.append(&data[7..]).unwrap(), 10);
        h.update(&data[7..]);
        let path = store.commit_written(w, h, 10).unwrap();
        assert_eq!(fs::read(path).unwrap(), data);
        assert_eq!(store.partial_len(&sha), 0);

        // Bad bytes are caught at commit and the partial file goes.
        let other = digest(b"good");
        let (mut w, mut h) = store.partial_writer(&other, 0).unwrap();
        w.append(b"evil").unwrap();
        h.update(b"evil");
        assert!(matches!(store.commit_written(w, h, 4), Err(CasError::DigestMismatch { .. })));
        assert_eq!(store.partial_len(&other), 0);
        assert_eq!(store.size(&other), None);
    }

    #[test]
    fn stale_partial_files_are_removed_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (old, fresh) = (digest(b"old"), digest(b"fresh"));
        store.append_partial(&old, 0, b"ol").unwrap();
        store.append_partial(&fresh, 0, b"fre").unwrap();
        let long_ago = std::time::SystemTime::now() - PARTIAL_AGE_MAX - std::time::Duration::from_secs(60);
        File::options().write(true).open(store.partial_path(&old)).unwrap().set_modified(long_ago).unwrap();
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.partial_len(&old), 0);
        assert_eq!(store.partial_len(&fresh), 3);
    }

    #[test]
    fn corrupt_partial_content_is_discarded_at_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let sha = digest(b"good");
        store.append_partial(&sha, 0, b"evil").unwrap();
        assert!(matches!(store.commit_partial(&sha, 4), Err(CasError::DigestMismatch { .. })));
        assert_eq!(store.partial_len(&sha), 0);
        assert_eq!(store.size(&sha), None);
    }

    #[test]
    fn placing_links_the_blob_and_verify_catches_tampering() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("cas")).unwrap();
        let (sha, _) = store.put_bytes(b"video").unwrap();
        let dest = dir.path().join("work/inputs/color.mp4");
        store.place(&sha, &dest).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"video");
        assert!(store.verify(&sha).unwrap());
        // Root ignores 0444; a job writing through its link must not poison the cache.
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o644)).unwrap();
        fs::write(&dest, b"VIDEO").unwrap();
        assert!(!store.verify(&sha).unwrap());
        assert_eq!(store.size(&sha), None);
    }
}
