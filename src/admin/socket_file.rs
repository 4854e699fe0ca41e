//! The admin socket's file: made with its final mode and group before anyone can open it,
//! moved into place over a stale socket left by a crashed run, and removed on shutdown.
//!
//! The socket is bound inside a fresh private (0700) directory next to the target path, given
//! its `socket_mode` and `socket_group` there, then renamed onto the target path: no peer ever
//! sees it with looser permissions. What is already at the path decides whether that may happen:
//! nothing, or a socket nobody listens on (connecting is refused), may be replaced; a socket a live
//! process answers on, or anything that is not a socket, is an error and is left untouched.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use tokio::net::UnixListener;

use crate::config::AdminConfig;

/// How long probing an existing socket for a live listener may take.
const LIVENESS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The file name of the socket inside the private directory (short: socket paths are limited
/// to about 107 bytes).
const PRIVATE_SOCKET_NAME: &str = "s";

/// Names private directories uniquely within this process.
static PRIVATE_DIR_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The socket file this process made, identified so that shutdown never removes a file that
/// another process has since put at the same path.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    device: u64,
    inode: u64,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Removes the socket file if it is still the one this process made.
    pub fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(metadata) if metadata.dev() == self.device && metadata.ino() == self.inode => {
                if let Err(error) = std::fs::remove_file(&self.path) {
                    tracing::warn!(path = %self.path.display(), %error, "cannot remove the admin socket");
                }
            }
            Ok(_) => tracing::warn!(
                path = %self.path.display(),
                "the admin socket was replaced by another file; leaving it in place"
            ),
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %self.path.display(), %error, "cannot check the admin socket before removing it")
            }
        }
    }
}

/// Binds the admin socket at `config.socket` with its mode and group; see the module docs.
pub async fn bind(config: &AdminConfig) -> anyhow::Result<(UnixListener, SocketFile)> {
    let path = &config.socket;
    check_target(path).await?;
    let group_id = match &config.socket_group {
        Some(group) => Some(
            resolve_group(group)
                .map_err(|why| anyhow!("cannot use socket_group for {}: {why}", path.display()))?,
        ),
        None => None,
    };
    let private_dir = PrivateDir::create_next_to(path)?;
    let staged = private_dir.path.join(PRIVATE_SOCKET_NAME);
    let listener = UnixListener::bind(&staged).with_context(|| {
        format!(
            "cannot bind the admin socket for {} (staged at {})",
            path.display(),
            staged.display()
        )
    })?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(config.socket_mode))
        .with_context(|| {
            format!(
                "cannot set mode {:04o} on the admin socket for {}",
                config.socket_mode,
                path.display()
            )
        })?;
    if let (Some(gid), Some(group)) = (group_id, &config.socket_group) {
        std::os::unix::fs::chown(&staged, None, Some(gid)).with_context(|| {
            format!(
                "cannot give the admin socket {} to group {group:?} (gid {gid})",
                path.display()
            )
        })?;
    }
    // The check again, as close to the rename as possible.
    let existing = check_target(path).await?;
    std::fs::rename(&staged, path).with_context(|| {
        format!(
            "cannot move the admin socket into place at {}",
            path.display()
        )
    })?;
    if existing == ExistingFile::StaleSocket {
        tracing::info!(path = %path.display(), "replaced a stale admin socket left by an earlier run");
    }
    drop(private_dir);
    let metadata = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot read back the admin socket {}", path.display()))?;
    let file = SocketFile {
        path: path.clone(),
        device: metadata.dev(),
        inode: metadata.ino(),
    };
    Ok((listener, file))
}

/// What is at the socket's path before pgshift puts its socket there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExistingFile {
    Nothing,
    /// A socket nobody listens on (connecting is refused), e.g. left by a crashed run.
    StaleSocket,
}

/// Nothing at `path`, or a stale socket: fine. A live socket or another kind of file: an error.
async fn check_target(path: &Path) -> anyhow::Result<ExistingFile> {
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(ExistingFile::Nothing),
        Err(error) => {
            return Err(error)
                .with_context(|| format!("cannot check the admin socket path {}", path.display()));
        }
    };
    if !metadata.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; pgshift will not replace it (remove it or choose another [admin] socket)",
            path.display()
        );
    }
    let probe = tokio::time::timeout(
        LIVENESS_PROBE_TIMEOUT,
        tokio::net::UnixStream::connect(path),
    );
    match probe.await {
        Err(_elapsed) => bail!(
            "another process holds {} (it accepts no connection); is another pgshift running?",
            path.display()
        ),
        Ok(Ok(_live)) => bail!("another pgshift is already listening on {}", path.display()),
        Ok(Err(error)) if error.kind() == io::ErrorKind::ConnectionRefused => {
            Ok(ExistingFile::StaleSocket)
        }
        Ok(Err(error)) if error.kind() == io::ErrorKind::NotFound => Ok(ExistingFile::Nothing),
        Ok(Err(error)) if error.kind() == io::ErrorKind::WouldBlock => bail!(
            "another pgshift is already listening on {} (its queue is full)",
            path.display()
        ),
        Ok(Err(error)) => Err(error).with_context(|| {
            format!(
                "cannot tell whether the existing admin socket {} is in use",
                path.display()
            )
        }),
    }
}

/// A fresh 0700 directory next to the socket's path, removed (with what is left in it) on drop.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create_next_to(target: &Path) -> anyhow::Result<PrivateDir> {
        let parent = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut attempts = 0;
        loop {
            let unique = PRIVATE_DIR_COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = parent.join(format!(".pgshift.{}.{unique}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {
                    let dir = PrivateDir { path };
                    // The umask may have taken the owner's bits; put exactly 0700 back.
                    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o700))
                        .with_context(|| format!("cannot make {} private", dir.path.display()))?;
                    return Ok(dir);
                }
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists && attempts < 100 => {
                    attempts += 1;
                }
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!(
                            "cannot create the admin socket {}: no private directory can be made in {}",
                            target.display(),
                            parent.display()
                        )
                    });
                }
            }
        }
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let staged = self.path.join(PRIVATE_SOCKET_NAME);
        if let Err(error) = std::fs::remove_file(&staged)
            && error.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %staged.display(), %error, "cannot remove a staged admin socket");
        }
        if let Err(error) = std::fs::remove_dir(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "cannot remove a temporary directory");
        }
    }
}

/// A group name (or a numeric gid) → gid: `/etc/group` first, then `getent group` (NSS, LDAP).
fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    if let Ok(text) = std::fs::read_to_string("/etc/group")
        && let Some(gid) = group_id_in_group_file(&text, group)
    {
        return Ok(gid);
    }
    let output = std::process::Command::new("getent")
        .args(["group", group])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    if let Ok(output) = output
        && output.status.success()
        && let Some(gid) = group_id_in_group_file(&String::from_utf8_lossy(&output.stdout), group)
    {
        return Ok(gid);
    }
    Err(format!("no group named {group:?}"))
}

/// The gid of `name` in text in `/etc/group` format (`name:password:gid:members`).
fn group_id_in_group_file(text: &str, name: &str) -> Option<u32> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split(':');
            let entry_name = fields.next()?;
            let _password = fields.next()?;
            let gid = fields.next()?;
            (entry_name == name)
                .then(|| gid.trim().parse().ok())
                .flatten()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_file_lookup() {
        let text = "# comment\nroot:x:0:\nwheel:x:10:alice,bob\nbroken\nstaff:x:notanumber:\n";
        assert_eq!(group_id_in_group_file(text, "root"), Some(0));
        assert_eq!(group_id_in_group_file(text, "wheel"), Some(10));
        assert_eq!(group_id_in_group_file(text, "whee"), None);
        assert_eq!(group_id_in_group_file(text, "staff"), None);
        assert_eq!(group_id_in_group_file(text, "broken"), None);
    }

    #[test]
    fn numeric_groups_are_gids() {
        assert_eq!(resolve_group("4242"), Ok(4242));
    }
}
