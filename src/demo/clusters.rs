//! The demo's two throwaway PostgreSQL clusters, blue and green.
//!
//! - [`find_pg_bin`] finds the server binaries (`$PG_BIN`, `pg_config --bindir`,
//!   `/usr/lib/postgresql/*/bin`, `/usr/local/pgsql/bin`, then Homebrew's and `$PATH`), or
//!   says how to install them ([`INSTALL_INSTRUCTIONS`]).
//! - [`Workdir`] is the run's temp dir; a detached watchdog shell removes it (and stops any
//!   postmaster left in it) if the demo dies without cleaning up.
//! - [`Cluster`] is one `initdb` + `postgres`, a direct child of the demo in its own process
//!   group (a Ctrl-C reaches only the demo, which stops it in order), on a free port on
//!   127.0.0.1, its Unix socket in a private dir. Run as root, the server binaries run as the
//!   `postgres` OS user (`CommandExt::uid`/`gid`; the user is read from `/etc/passwd` or `id`).
//!   A cluster is stopped by its PID (SIGINT, a fast shutdown), never by name.
//! - The SQL that makes green a logical replica of blue: the same roles with the same SCRAM
//!   verifiers (logical replication copies no roles), the same schema, data on blue, a
//!   publication and a subscription with `copy_data`. Keys are UUIDs: logical replication
//!   copies no sequences either.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use tokio::time::Instant;
use tokio_postgres::{Client, NoTls};

use crate::color::Color;

/// The demo's database, on both clusters.
pub const DATABASE: &str = "shop";
/// The role the application load logs in as (SCRAM-SHA-256, the same verifier on both).
pub const APP_USER: &str = "shop_app";
pub const APP_PASSWORD: &str = "shop-demo-password";
/// The tenants the load's sessions name (`-c pgshift.tenant=...`).
pub const TENANTS: [&str; 6] = ["acme", "globex", "initech", "umbrella", "hooli", "stark"];
/// Orders loaded into blue before anything starts.
pub const ORDERS_LOADED: u32 = 20_000;
/// The clusters' superuser, reachable only over their private Unix sockets.
pub const SUPERUSER: &str = "postgres";

/// The OS user the server runs as when the demo runs as root.
const PG_OS_USER: &str = "postgres";
/// How long `initdb`, a start, a stop or the initial copy may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// What to run when no server binaries are found.
pub const INSTALL_INSTRUCTIONS: &str = "\
pgshift demo needs PostgreSQL's server binaries (initdb and postgres). Install them with:
  Debian / Ubuntu:   sudo apt-get install -y postgresql
  Fedora:            sudo dnf install -y postgresql-server
  macOS (Homebrew):  brew install postgresql@16
then run `pgshift demo` again, or set PG_BIN to the directory that holds initdb and postgres.";

// ---------------------------------------------------------------------------------------------
// Binaries and the OS user
// ---------------------------------------------------------------------------------------------

fn has_server_binaries(dir: &Path) -> bool {
    dir.join("initdb").is_file() && dir.join("postgres").is_file()
}

/// The directory with `initdb` and `postgres`: `$PG_BIN`, else `pg_config --bindir`, else the
/// highest `/usr/lib/postgresql/*/bin`, else `/usr/local/pgsql/bin`, else Homebrew's
/// `postgresql@*` kegs, else a directory on `$PATH` holding both (Fedora's `/usr/bin`). The
/// error is the message to print, with the install commands.
pub fn find_pg_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|value| !value.is_empty()) {
        let dir = PathBuf::from(dir);
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
        return Err(format!(
            "PG_BIN={} holds no `initdb` and `postgres`: point it at PostgreSQL's server bin directory, or unset it.\n{INSTALL_INSTRUCTIONS}",
            dir.display()
        ));
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output()
        && output.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if has_server_binaries(&dir) {
            return Ok(dir);
        }
    }
    if let Some(dir) = highest_versioned(Path::new("/usr/lib/postgresql"), "") {
        return Ok(dir);
    }
    let source_install = PathBuf::from("/usr/local/pgsql/bin");
    if has_server_binaries(&source_install) {
        return Ok(source_install);
    }
    // Homebrew's versioned formulae are keg-only: not on $PATH.
    for parent in ["/opt/homebrew/opt", "/usr/local/opt"] {
        if let Some(dir) = highest_versioned(Path::new(parent), "postgresql@") {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server_binaries(&dir) {
                return Ok(dir);
            }
        }
    }
    Err(format!(
        "no PostgreSQL server binaries found (looked at $PG_BIN, `pg_config --bindir`, /usr/lib/postgresql/*/bin, /usr/local/pgsql/bin, Homebrew's postgresql@* and $PATH).\n{INSTALL_INSTRUCTIONS}"
    ))
}

/// The `bin` dir of the highest version under `parent` whose entries are named
/// `<prefix><version>` (`15`, `9.6`, `postgresql@16`).
fn highest_versioned(parent: &Path, prefix: &str) -> Option<PathBuf> {
    let names = fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().map(str::to_string));
    let mut found: Vec<(Vec<u32>, PathBuf)> = names
        .filter_map(|name| {
            let version = parse_version(name.strip_prefix(prefix)?)?;
            let bin = parent.join(&name).join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, dir)| dir)
}

/// `"9.6"` → `[9, 6]`; anything but dot-separated numbers → `None`.
pub fn parse_version(text: &str) -> Option<Vec<u32>> {
    text.split('.').map(|part| part.parse().ok()).collect()
}

/// An OS account the server binaries run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The entry for `name` in an `/etc/passwd` text.
pub fn parse_passwd(text: &str, name: &str) -> Option<OsUser> {
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != name {
            return None;
        }
        Some(OsUser {
            name: name.to_string(),
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: PathBuf::from(fields[5]),
        })
    })
}

/// One number printed by `id FLAGS...`.
fn id_number(args: &[&str]) -> Option<u32> {
    let output = Command::new("id").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

fn lookup_user(name: &str) -> Option<OsUser> {
    if let Ok(text) = fs::read_to_string("/etc/passwd")
        && let Some(user) = parse_passwd(&text, name)
    {
        return Some(user);
    }
    // Accounts from NSS (LDAP, systemd-homed, ...) are not in /etc/passwd: ask `id`.
    Some(OsUser {
        name: name.to_string(),
        uid: id_number(&["-u", name])?,
        gid: id_number(&["-g", name])?,
        home: PathBuf::from("/"),
    })
}

/// This process's effective uid: from `/proc/self/status`, else `id -u`.
pub fn effective_uid() -> Option<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        let uids = status.lines().find_map(|line| line.strip_prefix("Uid:"));
        if let Some(effective) = uids.and_then(|uids| uids.split_whitespace().nth(1)) {
            return effective.parse().ok();
        }
    }
    id_number(&["-u"])
}

/// `Some(postgres user)` when running as root (PostgreSQL refuses to run as root), `None`
/// otherwise (the clusters run as the current user).
pub fn server_os_user() -> Result<Option<OsUser>, String> {
    if effective_uid() != Some(0) {
        return Ok(None);
    }
    lookup_user(PG_OS_USER).map(Some).ok_or_else(|| {
        format!(
            "pgshift demo runs as root, but PostgreSQL refuses to run as root and there is no `{PG_OS_USER}` OS user to run it as: create one (`sudo useradd --system {PG_OS_USER}`; installing the postgresql package does) or run the demo as an ordinary user"
        )
    })
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

/// A `Command` for a server binary: `PG*` variables removed (a developer's PGPORT or PGDATA
/// must not interfere), run as `owner` when given, in `dir`.
fn server_command(program: &Path, owner: Option<&OsUser>, dir: &Path) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            command.env_remove(key);
        }
    }
    if let Some(user) = owner {
        command
            .uid(user.uid)
            .gid(user.gid)
            .env("HOME", &user.home)
            .env("USER", &user.name)
            .env("LOGNAME", &user.name);
    }
    command.current_dir(dir).stdin(Stdio::null());
    command
}

/// Waits for `child` to exit, polling (cancel-safe: the child stays with its owner).
async fn wait_exit(child: &mut Child, within: Duration) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` (`INT`, `TERM`) to `pid` with the `kill` command.
fn send_signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A child that is killed (SIGKILL) and reaped if it is still running when dropped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

// ---------------------------------------------------------------------------------------------
// The temp dir and its watchdog
// ---------------------------------------------------------------------------------------------

/// Run by `sh -c` with `$1` = the temp dir. Its stdin is a pipe only the demo holds: `read`
/// returns `done` when the demo cleaned up itself, or end-of-file when the demo died. Then it
/// stops every postmaster recorded in `$1/*/data/postmaster.pid` whose command line names that
/// data dir (so a recycled PID is never hit) by PID, and removes the dir.
const WATCHDOG_SCRIPT: &str = r#"
if read -r line && [ "$line" = done ]; then exit 0; fi
dir="$1"
ours() {
  if [ -r "/proc/$1/cmdline" ]; then tr '\0' ' ' < "/proc/$1/cmdline" | grep -qF -- "$2"
  else ps -ww -o args= -p "$1" 2>/dev/null | grep -qF -- "$2"; fi
}
for pidfile in "$dir"/*/data/postmaster.pid; do
  [ -f "$pidfile" ] || continue
  data="${pidfile%/postmaster.pid}"
  pid=$(head -n 1 "$pidfile")
  [ -n "$pid" ] && ours "$pid" "$data" || continue
  kill -INT "$pid" 2>/dev/null
  i=0
  while ours "$pid" "$data" && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  if ours "$pid" "$data"; then kill -KILL "$pid" 2>/dev/null; sleep 0.5; fi
done
rm -rf -- "$dir"
"#;

/// The watchdog shell: told `done` when the demo cleaned up, or woken by the demo's death.
struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    fn spawn(dir: &Path) -> std::io::Result<Watchdog> {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("pgshift-demo-watchdog")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group: a Ctrl-C aimed at the demo does not end it.
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take();
        Ok(Watchdog { child, stdin })
    }

    /// The demo cleaned up itself: the watchdog exits without doing anything.
    fn disarm(mut self) {
        use std::io::Write as _;
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"done\n");
        }
        let _ = self.child.wait();
    }
}

/// The demo's temp dir: the clusters, pgshift's config, admin socket and state file.
pub struct Workdir {
    path: PathBuf,
    watchdog: Option<Watchdog>,
}

impl Workdir {
    /// Creates `pgshift-demo-XXXXXX` under the temp dir (under `/tmp` when run as root and the
    /// temp dir is not reachable by the server's OS user), traversable by that user.
    pub fn create(owner: Option<&OsUser>) -> anyhow::Result<Workdir> {
        let mut base = std::env::temp_dir();
        if owner.is_some() && !traversable_by_others(&base) {
            base = PathBuf::from("/tmp");
        }
        let path = tempfile::Builder::new()
            .prefix("pgshift-demo-")
            .tempdir_in(&base)
            .with_context(|| format!("cannot create a temp dir in {}", base.display()))?
            .keep();
        let watchdog = Watchdog::spawn(&path);
        let mut workdir = Workdir {
            path,
            watchdog: None,
        };
        workdir.watchdog = Some(watchdog.context("cannot start the clean-up watchdog (sh)")?);
        // Others may pass through (the server's OS user must reach its cluster dir); the
        // clusters' dirs are their own, the admin socket is 0600.
        fs::set_permissions(&workdir.path, fs::Permissions::from_mode(0o711))
            .with_context(|| format!("cannot chmod {}", workdir.path.display()))?;
        Ok(workdir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The dir's own name (`pgshift-demo-XXXXXX`): it also prefixes the clusters' names, so
    /// every server process of this run shows it in `ps`.
    pub fn token(&self) -> String {
        self.path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pgshift-demo".into())
    }

    /// Removes the dir (stop the clusters first) and dismisses the watchdog.
    pub fn remove(&mut self) -> std::io::Result<()> {
        let removed = match fs::remove_dir_all(&self.path) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
            _ => Ok(()),
        };
        if removed.is_ok()
            && let Some(watchdog) = self.watchdog.take()
        {
            watchdog.disarm();
        }
        removed
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        // When removing fails, the watchdog (woken by its pipe closing) tries again.
        let _ = self.remove();
    }
}

/// Whether every ancestor of `dir` lets others through (mode o+x).
fn traversable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|ancestor| {
        fs::metadata(ancestor).is_ok_and(|meta| meta.permissions().mode() & 0o001 != 0)
    })
}

// ---------------------------------------------------------------------------------------------
// One cluster
// ---------------------------------------------------------------------------------------------

/// One throwaway cluster.
pub struct Cluster {
    pub color: Color,
    /// `cluster_name`: `<workdir token>-<color>`, shown by every server process in `ps`.
    pub name: String,
    /// `<workdir>/<color>`: the data dir, the socket dir and the server log.
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    bin: PathBuf,
    owner: Option<OsUser>,
    postmaster: Option<Child>,
}

impl Cluster {
    /// Lays out `<workdir>/<color>` (owned by the server's OS user) for a new cluster.
    pub fn prepare(
        workdir: &Workdir,
        color: Color,
        bin: &Path,
        owner: Option<&OsUser>,
    ) -> anyhow::Result<Cluster> {
        let dir = workdir.path().join(color.as_str());
        let socket_dir = dir.join("sock");
        fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::create_dir(&socket_dir)
            .with_context(|| format!("cannot create {}", socket_dir.display()))?;
        for path in [&dir, &socket_dir] {
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))?;
            if let Some(user) = owner {
                std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                    .with_context(|| format!("cannot chown {} to {}", path.display(), user.name))?;
            }
        }
        Ok(Cluster {
            color,
            name: format!("{}-{}", workdir.token(), color.as_str()),
            data_dir: dir.join("data"),
            log: dir.join("postgres.log"),
            socket_dir,
            dir,
            port: 0,
            bin: bin.to_path_buf(),
            owner: owner.cloned(),
            postmaster: None,
        })
    }

    fn command(&self, program: &str) -> Command {
        server_command(&self.bin.join(program), self.owner.as_ref(), &self.dir)
    }

    /// Runs `initdb` (superuser `postgres`, UTF-8, C locale, no fsync: a throwaway cluster).
    pub async fn initdb(&self) -> anyhow::Result<()> {
        let log_path = self.dir.join("initdb.log");
        let log = fs::File::create(&log_path)?;
        if let Some(user) = &self.owner {
            std::os::unix::fs::chown(&log_path, Some(user.uid), Some(user.gid))?;
        }
        let child = self
            .command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-U", SUPERUSER, "-E", "UTF8", "--locale=C", "--no-sync"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot run {}", self.bin.join("initdb").display()))?;
        let mut child = KillOnDrop(child);
        match wait_exit(&mut child.0, SETUP_TIMEOUT).await? {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!(
                "initdb for {} failed ({status}):\n{}",
                self.color,
                tail(&log_path, 30)
            ),
            None => bail!(
                "initdb for {} did not finish within {SETUP_TIMEOUT:?}",
                self.color
            ),
        }
    }

    /// Writes the settings and `pg_hba.conf`; `logical` turns on `wal_level = logical`.
    fn configure(&self, logical: bool) -> anyhow::Result<()> {
        let mut settings = format!(
            "\n# --- pgshift demo ({color}) ---\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = {socket}\nunix_socket_permissions = 0700\ncluster_name = {name}\nmax_connections = 200\nshared_buffers = 32MB\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\npassword_encryption = 'scram-sha-256'\nlogging_collector = off\n",
            color = self.color,
            port = self.port,
            socket = sql_literal(&self.socket_dir.to_string_lossy()),
            name = sql_literal(&self.name),
        );
        if logical {
            settings.push_str(
                "wal_level = logical\nmax_wal_senders = 10\nmax_replication_slots = 10\n",
            );
        }
        let conf = self.data_dir.join("postgresql.conf");
        let mut text =
            fs::read_to_string(&conf).with_context(|| format!("cannot read {}", conf.display()))?;
        text.push_str(&settings);
        // Writing over existing files keeps their owner (the server's OS user).
        fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
        let hba = "\
# pgshift demo: the superuser only over the private Unix socket; everyone else with SCRAM.
local   all   postgres                  trust
host    all   postgres    127.0.0.1/32  reject
host    all   all         127.0.0.1/32  scram-sha-256
";
        let hba_path = self.data_dir.join("pg_hba.conf");
        fs::write(&hba_path, hba)
            .with_context(|| format!("cannot write {}", hba_path.display()))?;
        Ok(())
    }

    /// `initdb` is done: configures the cluster and starts its postmaster on a free port,
    /// waiting until it accepts connections (a port taken meanwhile is retried).
    pub async fn start(&mut self, logical: bool) -> anyhow::Result<()> {
        let conf = self.data_dir.join("postgresql.conf");
        let pristine =
            fs::read_to_string(&conf).with_context(|| format!("cannot read {}", conf.display()))?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            fs::write(&conf, &pristine)?;
            self.port = free_port().context("cannot find a free port")?;
            self.configure(logical)?;
            match self.start_postmaster().await {
                Ok(()) => return Ok(()),
                Err(error) if attempt < 3 && tail(&self.log, 20).contains("already in use") => {
                    tracing::debug!(%error, "port taken meanwhile; another one");
                }
                Err(error) => return Err(error),
            }
        }
    }

    async fn start_postmaster(&mut self) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(&self.data_dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group (like pg_ctl's setsid): a Ctrl-C reaches only the demo,
            // which then stops the clusters in order.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot run {}", self.bin.join("postgres").display()))?;
        self.postmaster = Some(child);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = &mut self.postmaster
                && let Some(status) = child.try_wait()?
            {
                self.postmaster = None;
                bail!(
                    "the {} postmaster exited ({status}):\n{}",
                    self.color,
                    tail(&self.log, 20)
                );
            }
            if self.connect("postgres").await.is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop().await;
                bail!(
                    "the {} cluster did not accept connections within {READY_TIMEOUT:?}:\n{}",
                    self.color,
                    tail(&self.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The postmaster's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.postmaster.as_ref().map(Child::id)
    }

    /// The superuser on `database`, over the cluster's private Unix socket.
    pub async fn connect(&self, database: &str) -> anyhow::Result<Client> {
        let (client, connection) = tokio_postgres::Config::new()
            .host_path(&self.socket_dir)
            .port(self.port)
            .user(SUPERUSER)
            .dbname(database)
            .application_name("pgshift-demo")
            .connect_timeout(Duration::from_secs(5))
            .connect(NoTls)
            .await
            .with_context(|| format!("cannot connect to {} as {SUPERUSER}", self.color))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// A `psql` command line for the superuser (for `--keep`).
    pub fn psql_command(&self) -> String {
        format!(
            "{} \"host={} port={} user={SUPERUSER} dbname={DATABASE}\"",
            self.bin.join("psql").display(),
            self.socket_dir.display(),
            self.port
        )
    }

    /// Fast shutdown by PID (SIGINT), waiting for the postmaster to exit; SIGKILL after
    /// [`STOP_TIMEOUT`]. No-op when it is not running.
    pub async fn stop(&mut self) {
        let Some(child) = &mut self.postmaster else {
            return;
        };
        if matches!(child.try_wait(), Ok(None)) && send_signal(child.id(), "INT") {
            if let Ok(Some(_)) = wait_exit(child, STOP_TIMEOUT).await {
                self.postmaster = None;
                return;
            }
            tracing::warn!(color = %self.color, "the postmaster ignored SIGINT; killing it");
        }
        let _ = child.kill();
        let _ = child.wait();
        self.postmaster = None;
    }
}

impl Drop for Cluster {
    /// Last resort (a panic): SIGKILL by PID; the server's children exit when they notice.
    fn drop(&mut self) {
        if let Some(child) = &mut self.postmaster {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// SQL: roles, schema, data, replication
// ---------------------------------------------------------------------------------------------

/// `text` as an SQL string literal.
pub fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `text` as a libpq connection-string value.
pub fn conninfo_value(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The demo's tables, created on both colors. Keys are UUIDs: logical replication copies no
/// sequences, so a serial key would collide the day green takes writes.
pub const SCHEMA_SQL: &str = "
CREATE TABLE tenants (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name text NOT NULL UNIQUE
);
CREATE TABLE orders (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id uuid NOT NULL REFERENCES tenants (id),
    amount_cents integer NOT NULL CHECK (amount_cents > 0),
    placed_by text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_by_tenant ON orders (tenant_id, created_at DESC);
GRANT SELECT ON tenants TO shop_app;
GRANT SELECT, INSERT ON orders TO shop_app;
";

/// What the load needs on green, revoked to break it and granted back to repair it.
pub const BREAK_GREEN_SQL: &str = "REVOKE INSERT ON orders FROM shop_app";
pub const REPAIR_GREEN_SQL: &str = "GRANT INSERT ON orders TO shop_app";

/// The data loaded into blue.
fn data_sql() -> String {
    let tenants: Vec<String> = TENANTS
        .iter()
        .map(|name| format!("({})", sql_literal(name)))
        .collect();
    format!(
        "INSERT INTO tenants (name) VALUES {tenants};
INSERT INTO orders (tenant_id, amount_cents, placed_by, created_at)
SELECT t.id, 100 + (random() * 99900)::int, 'seed', now() - random() * interval '30 days'
FROM generate_series(1, {ORDERS_LOADED}) AS n
JOIN (SELECT id, row_number() OVER (ORDER BY name) - 1 AS k FROM tenants) AS t
  ON t.k = n % {count};",
        tenants = tenants.join(", "),
        count = TENANTS.len()
    )
}

/// Creates the application role on blue, then the same role on green with blue's SCRAM
/// verifier (logical replication copies no roles); the database on both.
pub async fn create_roles_and_databases(blue: &Cluster, green: &Cluster) -> anyhow::Result<()> {
    let blue_admin = blue.connect("postgres").await?;
    let green_admin = green.connect("postgres").await?;
    blue_admin
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; CREATE ROLE {APP_USER} LOGIN PASSWORD {}",
            sql_literal(APP_PASSWORD)
        ))
        .await
        .context("creating the role on blue")?;
    let verifier: String = blue_admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&APP_USER],
        )
        .await
        .context("reading the role's SCRAM verifier on blue")?
        .try_get(0)
        .context("the role has no password on blue")?;
    green_admin
        .batch_execute(&format!(
            "CREATE ROLE {APP_USER} LOGIN; ALTER ROLE {APP_USER} PASSWORD {}",
            sql_literal(&verifier)
        ))
        .await
        .context("creating the role on green with blue's verifier")?;
    for (cluster, admin) in [(blue, &blue_admin), (green, &green_admin)] {
        admin
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .await
            .with_context(|| format!("creating the database on {}", cluster.color))?;
    }
    Ok(())
}

/// The schema on both, the data on blue, the publication on blue and the subscription (with
/// `copy_data`) on green.
pub async fn create_schema_data_and_replication(
    blue: &Cluster,
    green: &Cluster,
) -> anyhow::Result<()> {
    let blue_db = blue.connect(DATABASE).await?;
    let green_db = green.connect(DATABASE).await?;
    let version: i32 = blue_db
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    for (cluster, db) in [(blue, &blue_db), (green, &green_db)] {
        if version < 130_000 {
            // gen_random_uuid() is built in from PostgreSQL 13 on.
            db.batch_execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
                .await?;
        }
        db.batch_execute(SCHEMA_SQL)
            .await
            .with_context(|| format!("creating the schema on {}", cluster.color))?;
    }
    blue_db
        .batch_execute(&data_sql())
        .await
        .context("loading blue")?;
    blue_db
        .batch_execute("CREATE PUBLICATION shop_pub FOR TABLE tenants, orders")
        .await
        .context("creating the publication on blue")?;
    let conninfo = format!(
        "host={} port={} user={SUPERUSER} dbname={DATABASE}",
        conninfo_value(&blue.socket_dir.to_string_lossy()),
        blue.port
    );
    // Alone in its query string: CREATE SUBSCRIPTION refuses to run in a transaction block.
    green_db
        .batch_execute(&format!(
            "CREATE SUBSCRIPTION shop_sub CONNECTION {} PUBLICATION shop_pub WITH (copy_data = true)",
            sql_literal(&conninfo)
        ))
        .await
        .context("creating the subscription on green")?;
    Ok(())
}

/// Waits until green's subscription has copied both tables and holds every row blue has.
pub async fn wait_caught_up(blue: &Cluster, green: &Cluster) -> anyhow::Result<i64> {
    let blue_db = blue.connect(DATABASE).await?;
    let green_db = green.connect(DATABASE).await?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        let row = green_db
            .query_one(
                "SELECT count(*) FILTER (WHERE srsubstate = 'r'), count(*) FROM pg_subscription_rel",
                &[],
            )
            .await?;
        let (ready, tables): (i64, i64) = (row.get(0), row.get(1));
        if tables == 2 && ready == 2 {
            let blue_rows = count_orders(&blue_db).await?;
            if count_orders(&green_db).await? == blue_rows {
                return Ok(blue_rows);
            }
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "green's subscription did not catch up within {SETUP_TIMEOUT:?} ({ready} of {tables} tables ready); green's log:\n{}",
                tail(&green.log, 20)
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn count_orders(client: &Client) -> anyhow::Result<i64> {
    Ok(client
        .query_one("SELECT count(*) FROM orders", &[])
        .await?
        .get(0))
}

/// Runs one statement on a cluster's demo database as the superuser.
pub async fn execute(cluster: &Cluster, sql: &str) -> anyhow::Result<()> {
    cluster
        .connect(DATABASE)
        .await?
        .batch_execute(sql)
        .await
        .with_context(|| format!("on {}: {sql}", cluster.color))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_entries_are_found_by_name() {
        let text = "root:x:0:0:root:/root:/bin/bash\npostgres:x:104:110:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n";
        let user = parse_passwd(text, "postgres").expect("found");
        assert_eq!((user.uid, user.gid), (104, 110));
        assert_eq!(user.home, PathBuf::from("/var/lib/postgresql"));
        assert!(parse_passwd(text, "postgre").is_none());
        assert!(parse_passwd("postgres:x:oops:1:::\n", "postgres").is_none());
    }

    #[test]
    fn versions_compare_as_numbers() {
        assert_eq!(parse_version("9.6"), Some(vec![9, 6]));
        assert!(parse_version("16").expect("16") > parse_version("9.6").expect("9.6"));
        assert_eq!(parse_version("15-beta"), None);
    }

    #[test]
    fn the_install_instructions_name_each_platform() {
        for command in [
            "sudo apt-get install -y postgresql",
            "sudo dnf install -y postgresql-server",
            "brew install postgresql@16",
        ] {
            assert!(INSTALL_INSTRUCTIONS.contains(command), "{command}");
        }
    }

    #[test]
    fn literals_are_quoted() {
        assert_eq!(sql_literal("it's"), "'it''s'");
        assert_eq!(conninfo_value("/tmp/a b'c"), "'/tmp/a b\\'c'");
    }

    #[test]
    fn the_seed_data_names_every_tenant() {
        let sql = data_sql();
        for tenant in TENANTS {
            assert!(sql.contains(&format!("('{tenant}')")), "{tenant}");
        }
    }
}
