//! The data directory: its lock file, which makes `serve` and `keys rotate` exclusive on one directory,
//! and [`sync_dir`], which makes the creation or renaming of a file in it (the master key files) survive
//! power loss.
//!
//! The lock is `flock(LOCK_EX)` on `<data_dir>/chatsync.lock`, taken without waiting. The kernel releases
//! it when the process ends, however it ends (even SIGKILL), so a stale lock file never blocks a restart;
//! the file is never deleted (deleting a lock file races with a process about to lock it). The file's
//! content (pid and command of the holder) is only for the error message of whoever finds it locked.
//!
//! The embedded store's database is locked too, by `PATH.lock` beside it ([`DataDirLock::with_store_file`]):
//! two servers with data directories of their own (`--database-url sqlite://PATH`) would otherwise share
//! one database, each with its own hub and cache.

use anyhow::Context as _;
use std::fs::File;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};

/// The name of the lock file in the data directory.
pub const LOCK_FILE: &str = "chatsync.lock";

/// An exclusive lock on a data directory, held until [`DataDirLock::release`] or drop.
pub struct DataDirLock {
    path: PathBuf,
    files: parking_lot::Mutex<Vec<File>>,
}

impl DataDirLock {
    /// Locks `data_dir` (creating it if needed) for `holder` (e.g. `"serve"`), or fails at once with a
    /// message naming the process that holds it.
    pub fn acquire(data_dir: &Path, holder: &str) -> anyhow::Result<DataDirLock> {
        Self::lock_dir(data_dir, holder, "data directory")
    }

    /// Also locks the embedded store's database (`store_url` `sqlite://PATH`; the lock of a PostgreSQL store
    /// is PostgreSQL's own) by `PATH.lock` beside it, whatever data directory names it: two servers with
    /// data directories of their own would otherwise share one database, each with its own hub and cache.
    /// A lock of the database's own, not of its directory, so that databases side by side in one directory
    /// do not exclude each other. Both are held until release or drop.
    pub fn with_store_file(self, store_url: &str, holder: &str) -> anyhow::Result<DataDirLock> {
        let Some(db) = store_url.strip_prefix("sqlite://") else { return Ok(self) };
        let dir = Path::new(db).parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        create_private_dir(dir).with_context(|| format!("cannot create the database's directory {}", dir.display()))?;
        let other = Self::lock_file(&PathBuf::from(format!("{db}.lock")), holder, "database", Path::new(db))?;
        self.files.lock().append(&mut other.files.lock());
        Ok(self)
    }

    fn lock_dir(data_dir: &Path, holder: &str, what: &str) -> anyhow::Result<DataDirLock> {
        create_private_dir(data_dir).with_context(|| format!("cannot create {what} {}", data_dir.display()))?;
        Self::lock_file(&data_dir.join(LOCK_FILE), holder, what, data_dir)
    }

    /// Locks the file `path` for `holder`; `what` and `shown` name the locked thing in the error.
    fn lock_file(path: &Path, holder: &str, what: &str, shown: &Path) -> anyhow::Result<DataDirLock> {
        let path = path.to_path_buf();
        // Never through a symbolic link: the holder's note is written over the file's content, so a link
        // planted in a directory others can write to would have this process overwrite the file it names.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; no memory is involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::WouldBlock {
                let owner = std::fs::read_to_string(&path).unwrap_or_default();
                let owner = owner.trim();
                let owner = if owner.is_empty() { String::new() } else { format!(" ({owner})") };
                anyhow::bail!(
                    "{what} {} is in use by another chatsync process{owner}: `serve` and `keys rotate` \
                     each need it to themselves; stop the other one first",
                    shown.display()
                );
            }
            return Err(err).with_context(|| format!("cannot lock {}", path.display()));
        }
        let note = format!("pid {}, {holder}\n", std::process::id());
        if let Err(e) = file.set_len(0).and_then(|()| file.write_all(note.as_bytes())) {
            tracing::debug!(error = %e, "cannot record the lock holder");
        }
        Ok(DataDirLock { path, files: parking_lot::Mutex::new(vec![file]) })
    }

    /// A lock that holds nothing (a node assembled in-process on a store another node owns, in tests).
    pub fn none() -> DataDirLock {
        DataDirLock { path: PathBuf::new(), files: parking_lot::Mutex::new(Vec::new()) }
    }

    /// Releases the lock now (also done on drop).
    pub fn release(&self) {
        self.files.lock().clear();
    }

    /// The lock file (of the data directory).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates `dir` and its missing parents with mode 0700 (before the umask): the database holds user
/// ids, device labels and the hashes of session tokens and API keys in the clear (only chat content is
/// encrypted), and SQLite creates its files 0644. A directory that exists is left as it is.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Flushes `dir` itself to disk, so that files just created in it, or renamed within it, are still there
/// after a power loss (fsync of a file does not cover its directory entry).
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot flush data directory {} to disk", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_directory_is_created_private_and_an_existing_one_left_as_it_is() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("a/data");
        let _lock = DataDirLock::acquire(&data, "serve").unwrap();
        for d in [dir.path().join("a"), data] {
            assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700, "{}", d.display());
        }
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o750)).unwrap();
        let _lock = DataDirLock::acquire(&shared, "serve").unwrap();
        assert_eq!(std::fs::metadata(&shared).unwrap().permissions().mode() & 0o777, 0o750);
    }

    #[test]
    fn a_second_lock_fails_until_the_first_is_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path(), "serve").unwrap();
        let err = DataDirLock::acquire(dir.path(), "keys rotate").err().expect("the directory is locked");
        let text = format!("{err:#}");
        assert!(text.contains("in use by another chatsync process") && text.contains("serve"), "{text}");
        first.release();
        let again = DataDirLock::acquire(dir.path(), "keys rotate").unwrap();
        drop(again);
        DataDirLock::acquire(dir.path(), "serve").unwrap();
    }
}
