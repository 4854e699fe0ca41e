//! Test support: real PostgreSQL "blue" and "green" clusters for pgshift's
//! integration tests.
//!
//! Every `tests/*.rs` binary that says `mod support;` can call
//! [`shared_pair()`] to get a blue/green pair of throw-away PostgreSQL clusters
//! started from the machine's PostgreSQL binaries (see [`pg_bin_dir()`]). The
//! pair is started once per test binary (tests run in parallel threads and
//! share it) and is torn down automatically when the test process exits,
//! however it exits (normal exit, panic, abort, SIGKILL): every cluster has a
//! detached watchdog shell that waits for the test process to go away, then
//! stops the postmaster and removes the cluster's temp dir.
//!
//! Tests that stop, kill or otherwise damage a cluster must use their own pair,
//! [`ClusterPair::start_private()`], which is cleaned up on drop.
//!
//! ```ignore
//! mod support;
//! use support::{shared_pair, TEST_PASSWORD, TEST_USER};
//!
//! #[tokio::test]
//! async fn example() {
//!     let pair = shared_pair();
//!     let blue = pair.blue.connect_app().await; // pgshift_test / SCRAM / db app
//!     let dsn = pair.green.dsn(TEST_USER, Some(TEST_PASSWORD), "app");
//!     assert_eq!(pair.blue.psql("SELECT current_setting('cluster_name')"), "blue");
//! }
//! ```
//!
//! How the clusters are set up:
//!
//! * `initdb -U postgres` runs once per test binary into a template dir; roles,
//!   databases and `pg_hba.conf` are set up in the template (single-user mode),
//!   and each cluster gets a copy of it (private pairs too).
//! * Each cluster lives in its own temp dir (`pgshift-test-<color>-*` under
//!   `/dev/shm` if it is a big enough tmpfs, else under `$TMPDIR`; override
//!   with `$PGSHIFT_TEST_TMPDIR`) with the data dir, the unix socket dir
//!   (`sock/`) and the server log (`postgres.log`) inside it, listens on a
//!   free port on 127.0.0.1 only and has `cluster_name` set to its color (so
//!   `SHOW cluster_name` or `inet_server_port()` tells them apart). Tuned for
//!   speed (`fsync=off`, ...); `wal_level=logical`, 10 WAL senders/slots.
//! * When the tests run as root, the server binaries (which refuse to run as
//!   root) run as the `postgres` OS user; the temp dirs are chowned to it.
//! * The postmaster is a direct child of the test process (no `pg_ctl`), so
//!   stop/kill/restart are precise and a killed postmaster is reaped even
//!   where PID 1 does not reap orphans.
//!
//! Roles (see [`HBA_CONF`]):
//!
//! | user           | password           | host auth       | notes                          |
//! |----------------|--------------------|-----------------|--------------------------------|
//! | `postgres`     | -                  | trust           | superuser, also over the socket|
//! | `pgshift_test` | `pgshift_test_pw`  | scram-sha-256   | LOGIN CREATEDB REPLICATION     |
//! | `bulk`         | -                  | trust           | LOGIN CREATEDB, for mass logins|
//! | `md5_user`     | `md5_pw`           | md5             | password stored as md5         |
//! | `plain_user`   | `plain_pw`         | password        | cleartext password auth        |
//!
//! Databases `app`, `tenant_42` and `other_db` are owned by `pgshift_test`;
//! everyone may connect to them and create objects in their `public` schema.
#![allow(dead_code)]

use std::ffi::{CStr, CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Password-authenticated (SCRAM-SHA-256) test user; owns the test databases.
pub const TEST_USER: &str = "pgshift_test";
pub const TEST_PASSWORD: &str = "pgshift_test_pw";
/// Trusted user (no password) for tests that open very many sessions.
pub const BULK_USER: &str = "bulk";
/// User authenticated with the `md5` method (password stored as md5).
pub const MD5_USER: &str = "md5_user";
pub const MD5_PASSWORD: &str = "md5_pw";
/// User authenticated with the cleartext `password` method.
pub const PLAIN_USER: &str = "plain_user";
pub const PLAIN_PASSWORD: &str = "plain_pw";
/// Superuser (trusted over the unix socket and 127.0.0.1).
pub const SUPERUSER: &str = "postgres";
/// Database owned by [`TEST_USER`] on each cluster.
pub const APP_DB: &str = "app";
/// Extra databases (owned by [`TEST_USER`]) for routing-by-database tests.
pub const TENANT_DB: &str = "tenant_42";
pub const OTHER_DB: &str = "other_db";

/// How long a postmaster may take to become ready (or to stop).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// The OS user the server runs as when the tests run as root.
const PG_OS_USER: &str = "postgres";

/// Settings shared by all test clusters (appended to `postgresql.conf`).
const COMMON_CONF: &str = "
# --- pgshift test settings ---
listen_addresses = '127.0.0.1'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 32MB
max_connections = 300
wal_level = logical
max_wal_senders = 10
max_replication_slots = 10
password_encryption = 'scram-sha-256'
huge_pages = off
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
";

/// Roles and databases, run in single-user mode against the template's
/// `template1` (one statement per line: single-user mode ends a statement at
/// a newline). `{strategy}` is ` STRATEGY FILE_COPY` on PostgreSQL 15+ (no
/// WAL copy of each database, so the template stays small).
const SETUP_SQL: &str = "
SET password_encryption = 'scram-sha-256';
CREATE ROLE pgshift_test LOGIN CREATEDB REPLICATION PASSWORD 'pgshift_test_pw';
CREATE ROLE bulk LOGIN CREATEDB;
CREATE ROLE plain_user LOGIN PASSWORD 'plain_pw';
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD 'md5_pw';
SET password_encryption = 'scram-sha-256';
GRANT CREATE ON SCHEMA public TO PUBLIC;
CREATE DATABASE app OWNER pgshift_test{strategy};
CREATE DATABASE tenant_42 OWNER pgshift_test{strategy};
CREATE DATABASE other_db OWNER pgshift_test{strategy};
GRANT CONNECT, TEMPORARY ON DATABASE app, tenant_42, other_db TO PUBLIC;
";

/// `pg_hba.conf` of every test cluster (first match wins).
pub const HBA_CONF: &str = "\
# TYPE  DATABASE     USER          ADDRESS        METHOD
local   all          all                          trust
local   replication  all                          trust
host    all          postgres      127.0.0.1/32   trust
host    all          bulk          127.0.0.1/32   trust
host    all          pgshift_test  127.0.0.1/32   scram-sha-256
host    all          md5_user      127.0.0.1/32   md5
host    all          plain_user    127.0.0.1/32   password
host    replication  postgres      127.0.0.1/32   trust
host    replication  pgshift_test  127.0.0.1/32   scram-sha-256
host    all          all           127.0.0.1/32   scram-sha-256
host    replication  all           127.0.0.1/32   scram-sha-256
";

/// Watchdog run by `sh -c` with `$1` = dir to remove, `$2` = data dir (may be
/// empty). Its stdin is a pipe whose write end only the test process holds, so
/// `read` returns when the test process exits (or when the handle is
/// dropped). It then stops the postmaster recorded in `postmaster.pid` (only
/// if that process's command line mentions this data dir, so a recycled pid
/// is never hit) and removes the dir. Reading the line `done` instead means
/// the test process has cleaned up itself: exit at once.
const WATCHDOG_SCRIPT: &str = r#"
if read -r line && [ "$line" = done ]; then exit 0; fi
dir="$1"; data="$2"
ours() {
  if [ -r "/proc/$1/cmdline" ]; then tr '\0' ' ' < "/proc/$1/cmdline" | grep -qF -- "$data"
  else ps -ww -o args= -p "$1" 2>/dev/null | grep -qF -- "$data"; fi
}
if [ -n "$data" ] && [ -f "$data/postmaster.pid" ]; then
  pid=$(head -n 1 "$data/postmaster.pid")
  if [ -n "$pid" ] && ours "$pid"; then
    kill -QUIT "$pid" 2>/dev/null
    i=0
    while ours "$pid" && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    # PostgreSQL puts each child in its own session: kill them by parent pid.
    if ours "$pid"; then pkill -KILL -P "$pid" 2>/dev/null; kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
  fi
fi
rm -rf -- "$dir"
# Second pass in case something was still writing into the dir.
sleep 1
rm -rf -- "$dir"
"#;

// ---------------------------------------------------------------------------
// Binaries and OS user
// ---------------------------------------------------------------------------

/// Runs psql with a connection string and `args` off the async workers, with a clean
/// environment: no PG* variables, HOME in `home` (no ~/.postgresql files).
pub async fn psql_clean(conninfo: String, args: &[&str], home: &Path) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
    let home = home.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(pg_bin_dir().join("psql"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PG") {
                command.env_remove(key);
            }
        }
        command
            .env("HOME", home)
            .env("PGCONNECT_TIMEOUT", "10")
            .args(["-X", "-A", "-t", "-d", &conninfo])
            .args(args)
            .output()
            .expect("psql runs")
    })
    .await
    .expect("psql thread")
}

/// Directory holding the PostgreSQL server binaries (`initdb`, `postgres`,
/// `psql`, `pgbench`, ...): `$PG_BIN`, else `pg_config --bindir` (if it holds
/// `initdb`), else the highest `/usr/lib/postgresql/*/bin`, else
/// `/usr/local/pgsql/bin`. Panics if none has `initdb`.
pub fn pg_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(find_pg_bin_dir).clone()
}

fn find_pg_bin_dir() -> PathBuf {
    let has_initdb = |d: &Path| d.join("initdb").is_file();
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            has_initdb(&dir),
            "PG_BIN={} has no `initdb`; point it at the PostgreSQL server bin dir",
            dir.display()
        );
        return dir;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_initdb(&dir) {
            return dir;
        }
    }
    let mut versioned: Vec<(Vec<u32>, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e
                .file_name()
                .to_str()?
                .split('.')
                .map(|p| p.parse::<u32>().ok())
                .collect::<Option<Vec<u32>>>()?;
            let bin = e.path().join("bin");
            has_initdb(&bin).then_some((version, bin))
        })
        .collect();
    versioned.sort();
    if let Some((_, dir)) = versioned.pop() {
        return dir;
    }
    let local = PathBuf::from("/usr/local/pgsql/bin");
    if has_initdb(&local) {
        return local;
    }
    panic!(
        "no PostgreSQL server binaries found (looked at $PG_BIN, `pg_config --bindir`, \
         /usr/lib/postgresql/*/bin, /usr/local/pgsql/bin). Install them, e.g. \
         `apt-get install -y postgresql`, or set PG_BIN to the dir containing initdb/postgres."
    );
}

/// The OS account the server runs as when the tests run as root.
#[derive(Debug, Clone)]
pub struct PgOsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// `Some(user)` when running as root (the server must then run as the
/// `postgres` OS user), `None` otherwise (everything runs as the current user).
pub fn pg_os_user() -> Option<&'static PgOsUser> {
    static USER: OnceLock<Option<PgOsUser>> = OnceLock::new();
    USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        Some(lookup_user(PG_OS_USER).unwrap_or_else(|| {
            panic!(
                "tests run as root, but PostgreSQL refuses to run as root and there is no \
                 `{PG_OS_USER}` OS user to run it as (`apt-get install -y postgresql` creates \
                 it, or `useradd -r {PG_OS_USER}`)"
            )
        }))
    })
    .as_ref()
}

fn lookup_user(name: &str) -> Option<PgOsUser> {
    let cname = CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: all pointers are valid for the duration of the call; buf is
    // large enough for any sane passwd entry (ERANGE just yields None).
    let rc = unsafe {
        libc::getpwnam_r(
            cname.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_dir points into buf, NUL-terminated.
    let home = unsafe { CStr::from_ptr(pwd.pw_dir) }
        .to_string_lossy()
        .into_owned();
    Some(PgOsUser {
        name: name.to_string(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home: PathBuf::from(home),
    })
}

/// Makes `cmd` run as the `postgres` OS user when the tests run as root
/// (setuid/setgid in the child, supplementary groups dropped, HOME/USER
/// adjusted); a no-op otherwise. Only the server binaries need this; client
/// tools (psql, pgbench) also run fine as root.
pub fn run_as_pg_user(cmd: &mut Command) -> &mut Command {
    if let Some(u) = pg_os_user() {
        cmd.uid(u.uid)
            .gid(u.gid)
            .env("HOME", &u.home)
            .env("USER", &u.name)
            .env("LOGNAME", &u.name);
    }
    cmd
}

/// A `Command` for `program` that runs as the server's OS user (see
/// [`run_as_pg_user`]) with every inherited `PG*` environment variable
/// removed, so a developer's PGHOST/PGPORT/PGDATA/... cannot interfere.
pub fn pg_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    run_as_pg_user(&mut cmd);
    cmd
}

/// Runs `cmd`, panicking with its stderr/stdout if it fails; returns stdout.
fn run_checked(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {cmd:?}\n--- stderr ---\n{}\n--- stdout ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// chowns `path` to the server's OS user when running as root.
fn give_to_pg_user(path: &Path) {
    if let Some(u) = pg_os_user() {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// Base dir for the temp dirs: `$PGSHIFT_TEST_TMPDIR` if set; else `/dev/shm`
/// if it is a tmpfs with at least 2 GiB free (copying and initdb on a
/// disk-backed /tmp cost seconds of system time on busy CI machines; on tmpfs
/// tens of milliseconds); else `$TMPDIR`/`/tmp`. When root, every ancestor
/// must be traversable by the `postgres` user; if `$TMPDIR` isn't (e.g. under
/// /root), /tmp is used.
fn temp_base() -> PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        if let Some(dir) = std::env::var_os("PGSHIFT_TEST_TMPDIR").filter(|v| !v.is_empty()) {
            return PathBuf::from(dir);
        }
        let shm = Path::new("/dev/shm");
        if shm.is_dir() && free_bytes(shm) >= 2 << 30 && traversable(shm) {
            return shm.to_path_buf();
        }
        let base = std::env::temp_dir();
        if pg_os_user().is_none() || traversable(&base) {
            base
        } else {
            PathBuf::from("/tmp")
        }
    })
    .clone()
}

/// Whether every ancestor of `dir` is searchable by other users.
fn traversable(dir: &Path) -> bool {
    dir.ancestors().all(|p| {
        fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o001 != 0)
            .unwrap_or(false)
    })
}

/// Free space of the filesystem holding `dir` (0 if unknown).
fn free_bytes(dir: &Path) -> u64 {
    let Ok(path) = CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and out-pointer.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64)
}

/// Creates a fresh temp dir (mode 0755, owned by the server's OS user).
fn make_temp_dir(prefix: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(temp_base())
        .expect("create temp dir")
        .keep();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
    give_to_pg_user(&dir);
    dir
}

/// A detached `sh` that removes `dir` (after stopping the postmaster of
/// `data_dir`, if given) as soon as the handle is dropped or the test process
/// exits, however it exits.
struct Watchdog {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Watchdog {
    fn spawn(dir: &Path, data_dir: Option<&Path>) -> Watchdog {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("pgshift-test-watchdog")
            .arg(dir)
            .arg(data_dir.map(Path::as_os_str).unwrap_or_default())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C aimed at the test run must not
            // kill the watchdog before it has cleaned up.
            .process_group(0)
            .spawn()
            .expect("spawn cleanup watchdog (sh)");
        let stdin = child.stdin.take();
        Watchdog { child, stdin }
    }

    /// Triggers the cleanup now and waits for it.
    fn fire(&mut self) {
        if let Some(stdin) = self.stdin.take() {
            drop(stdin);
            let _ = self.child.wait();
        }
    }

    /// Tells the watchdog there is nothing left to clean up.
    fn disarm(&mut self) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"done\n");
            drop(stdin);
            let _ = self.child.wait();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.fire();
    }
}

// ---------------------------------------------------------------------------
// Template
// ---------------------------------------------------------------------------

struct Template {
    data_dir: PathBuf,
    _watchdog: Watchdog,
}

/// initdb + setup, once per test binary; every cluster copies this data dir.
fn template_data_dir() -> &'static Path {
    static TEMPLATE: OnceLock<Template> = OnceLock::new();
    &TEMPLATE.get_or_init(make_template).data_dir
}

fn make_template() -> Template {
    let root = make_temp_dir("pgshift-test-template-");
    let watchdog = Watchdog::spawn(&root, None);
    let bin = pg_bin_dir();
    let data_dir = root.join("data");
    run_checked(
        die_with_parent(&mut pg_command(bin.join("initdb")))
            .current_dir(&root)
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--no-sync",
                "--wal-segsize=1",
            ])
            .args(["--encoding=UTF8", "--locale=C"]),
        "initdb",
    );
    append_to(&data_dir.join("postgresql.conf"), COMMON_CONF);
    fs::write(data_dir.join("pg_hba.conf"), HBA_CONF).expect("write pg_hba.conf");

    // Roles and databases, in single-user mode (no need to start a server).
    let major: u32 = fs::read_to_string(data_dir.join("PG_VERSION"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let strategy = if major >= 15 {
        " STRATEGY FILE_COPY"
    } else {
        ""
    };
    let mut child = die_with_parent(&mut pg_command(bin.join("postgres")))
        .current_dir(&root)
        .args(["--single", "-D"])
        .arg(&data_dir)
        .args(["-c", "exit_on_error=on", "template1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn postgres --single");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(SETUP_SQL.replace("{strategy}", strategy).as_bytes())
        .expect("write setup SQL");
    let out = child.wait_with_output().expect("wait postgres --single");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || stderr.contains("ERROR") || stderr.contains("FATAL") {
        panic!(
            "template setup (postgres --single) failed ({}):\n{stderr}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Template {
        data_dir,
        _watchdog: watchdog,
    }
}

/// `cp -a` for a freshly initdb'ed data dir: copies dirs, files and symlinks
/// with their permission bits, owned by the server's OS user.
fn copy_tree(src: &Path, dst: &Path) -> std::io::Result<()> {
    fs::create_dir(dst)?;
    fs::set_permissions(dst, fs::metadata(src)?.permissions())?;
    give_to_pg_user(dst);
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let (from, to) = (entry.path(), dst.join(entry.file_name()));
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            copy_tree(&from, &to)?;
        } else if file_type.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)?;
            if let Some(u) = pg_os_user() {
                std::os::unix::fs::lchown(&to, Some(u.uid), Some(u.gid))?;
            }
        } else {
            fs::copy(&from, &to)?; // keeps the permission bits
            give_to_pg_user(&to);
        }
    }
    Ok(())
}

/// Makes the child die with the thread that spawned it (Linux), for
/// short-lived helpers (initdb, single-user postgres) that must not keep
/// writing into a temp dir after the test process is gone.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: prctl/getppid/_exit are async-signal-safe. std runs this
        // after setuid, which would otherwise reset the death signal.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    cmd
}

fn append_to(path: &Path, text: &str) {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// A free TCP port on 127.0.0.1 (bound and released; callers retry if someone
/// grabs it in between).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// One running (or stopped) test cluster.
pub struct Cluster {
    color: String,
    port: u16,
    root_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    bin_dir: PathBuf,
    postmaster: Mutex<Option<Child>>,
    watchdog: Mutex<Option<Watchdog>>,
}

/// Why a start attempt failed.
enum StartError {
    /// Someone else listens on the port.
    PortInUse(String),
    /// Leftovers of a killed postmaster (backends still attached to the old
    /// shared memory, stale lock file); goes away by itself.
    Transient(String),
    Other(String),
}

impl Cluster {
    /// Creates a new cluster named `color` from the template and starts it on
    /// a free port. Stopped and removed on drop (and at process exit).
    pub fn start_new(color: &str) -> Cluster {
        let root_dir = make_temp_dir(&format!("pgshift-test-{color}-"));
        let data_dir = root_dir.join("data");
        // The watchdog exists before the server does: an abort anywhere after
        // this point still cleans up.
        let watchdog = Watchdog::spawn(&root_dir, Some(&data_dir));
        let socket_dir = root_dir.join("sock");
        fs::create_dir(&socket_dir).expect("create socket dir");
        give_to_pg_user(&socket_dir);

        // Copied in-process (not `cp -a`) so that nothing keeps writing into
        // the dir if the test process dies mid-copy.
        let template = template_data_dir();
        copy_tree(template, &data_dir).unwrap_or_else(|e| {
            panic!("copy {} -> {}: {e}", template.display(), data_dir.display())
        });
        append_to(
            &data_dir.join("postgresql.conf"),
            &format!(
                "unix_socket_directories = '{}'\ncluster_name = '{color}'\n",
                socket_dir.display()
            ),
        );

        let mut cluster = Cluster {
            color: color.to_string(),
            port: 0,
            log_path: root_dir.join("postgres.log"),
            root_dir,
            data_dir,
            socket_dir,
            bin_dir: pg_bin_dir(),
            postmaster: Mutex::new(None),
            watchdog: Mutex::new(Some(watchdog)),
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut attempts = 0;
        loop {
            attempts += 1;
            cluster.port = free_port();
            append_to(
                &cluster.data_dir.join("postgresql.conf"),
                &format!("port = {}\n", cluster.port),
            );
            match cluster.try_start(deadline) {
                Ok(()) => return cluster,
                Err(StartError::PortInUse(_)) if attempts < 10 && Instant::now() < deadline => {}
                Err(StartError::PortInUse(msg))
                | Err(StartError::Transient(msg))
                | Err(StartError::Other(msg)) => {
                    panic!("{color} cluster failed to start: {msg}")
                }
            }
        }
    }

    /// The postmaster handle (poisoning ignored: Drop runs during unwinding).
    fn pm(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.postmaster.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn color_name(&self) -> &str {
        &self.color
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Unix socket directory (the socket is `.s.PGSQL.<port>` in it).
    pub fn socket_dir(&self) -> &Path {
        &self.socket_dir
    }

    /// The cluster's temp dir (holds data dir, socket dir and log).
    pub fn root_dir(&self) -> &Path {
        &self.root_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// Path of a PostgreSQL binary, e.g. `bin("pgbench")`.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }

    /// libpq/tokio-postgres key=value connection string over TCP.
    pub fn dsn(&self, user: &str, password: Option<&str>, dbname: &str) -> String {
        let mut s = format!(
            "host=127.0.0.1 port={} user={} dbname={}",
            self.port,
            quote_conn_value(user),
            quote_conn_value(dbname)
        );
        if let Some(pw) = password {
            s.push_str(" password=");
            s.push_str(&quote_conn_value(pw));
        }
        s
    }

    /// Connects with tokio-postgres (NoTls) and spawns the connection task on
    /// the current tokio runtime.
    pub async fn connect(
        &self,
        user: &str,
        password: Option<&str>,
        dbname: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.dsn(user, password, dbname), tokio_postgres::NoTls)
                .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// [`TEST_USER`] with its password to database [`APP_DB`].
    pub async fn connect_app(&self) -> tokio_postgres::Client {
        self.connect(TEST_USER, Some(TEST_PASSWORD), APP_DB)
            .await
            .unwrap_or_else(|e| panic!("connect to {} app: {e}", self.color))
    }

    /// Runs `sql` with psql as the superuser over the unix socket in database
    /// `postgres`. Output is unaligned and tuples-only (`-A -t`; columns
    /// separated by `|`, one row per line), with the trailing newline
    /// trimmed. Stops at the first error and panics with psql's stderr.
    pub fn psql(&self, sql: &str) -> String {
        self.psql_db("postgres", sql)
    }

    /// Like [`Cluster::psql`] in database `dbname`.
    pub fn psql_db(&self, dbname: &str, sql: &str) -> String {
        let mut child = pg_command(self.bin("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args(["-p", &self.port.to_string(), "-U", SUPERUSER, "-d", dbname])
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        let mut stdin = child.stdin.take().unwrap();
        let sql_owned = sql.to_string();
        // Write from a thread so a large result can't deadlock against us.
        let writer = thread::spawn(move || {
            let _ = stdin.write_all(sql_owned.as_bytes());
        });
        let out = child.wait_with_output().expect("wait psql");
        let _ = writer.join();
        if !out.status.success() {
            panic!(
                "psql on {} (db {dbname}) failed ({}):\nSQL: {sql}\n{}",
                self.color,
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
        while s.ends_with('\n') {
            s.pop();
        }
        s
    }

    /// Pid of the running postmaster, `None` if it is stopped or dead.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let mut guard = self.pm();
        let child = guard.as_mut()?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.postmaster_pid().is_some()
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`, `libc::SIGQUIT`) to the
    /// postmaster. Returns immediately; use [`Cluster::wait_stopped`] to wait
    /// for it to exit. Panics if it is not running.
    pub fn kill_postmaster(&self, signal: i32) {
        let pid = self
            .postmaster_pid()
            .unwrap_or_else(|| panic!("{} postmaster is not running", self.color));
        // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
        let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Waits (up to 30 s) for the postmaster to exit and reaps it. Returns
    /// false on timeout.
    pub fn wait_stopped(&self) -> bool {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        let mut guard = self.pm();
        let Some(child) = guard.as_mut() else {
            return true;
        };
        while Instant::now() < deadline {
            if !matches!(child.try_wait(), Ok(None)) {
                *guard = None;
                return true;
            }
            thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Fast shutdown (SIGINT; like `pg_ctl stop -m fast`), waiting for the
    /// postmaster to exit. No-op if it is not running.
    pub fn stop(&self) {
        self.stop_with(libc::SIGINT);
    }

    /// Immediate shutdown (SIGQUIT; like `pg_ctl stop -m immediate`).
    pub fn stop_immediate(&self) {
        self.stop_with(libc::SIGQUIT);
    }

    fn stop_with(&self, signal: i32) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(pid as libc::pid_t, signal) };
        if !self.wait_stopped() {
            kill_tree(pid);
            self.wait_stopped();
            panic!(
                "{} postmaster did not stop within {STARTUP_TIMEOUT:?}; killed it\n{}",
                self.color,
                self.log_tail(30)
            );
        }
    }

    /// (Re)starts the postmaster on the same data dir and port, e.g. after
    /// [`Cluster::stop`] or [`Cluster::kill_postmaster`] (crash recovery
    /// runs as needed). Waits until it accepts connections (30 s, then
    /// panics with the log tail). No-op if already running.
    pub fn start(&self) {
        if self.is_running() {
            return;
        }
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            match self.try_start(deadline) {
                Ok(()) => return,
                // After a kill the old backends may still hold the shared
                // memory/port for a moment; keep trying until the deadline.
                Err(StartError::PortInUse(_) | StartError::Transient(_))
                    if Instant::now() + Duration::from_millis(200) < deadline =>
                {
                    thread::sleep(Duration::from_millis(100));
                }
                Err(StartError::PortInUse(msg))
                | Err(StartError::Transient(msg))
                | Err(StartError::Other(msg)) => {
                    panic!("{} cluster failed to restart: {msg}", self.color)
                }
            }
        }
    }

    /// One attempt to start the postmaster and wait for it to be ready.
    fn try_start(&self, deadline: Instant) -> Result<(), StartError> {
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open server log");
        let log_start = log.seek(SeekFrom::End(0)).unwrap_or(0);
        let mut child = pg_command(self.bin("postgres"))
            .current_dir(&self.root_dir)
            .arg("-D")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log fd"))
            .stderr(log)
            // Own process group (like pg_ctl's setsid): a Ctrl-C aimed at the
            // test run doesn't reach it; the watchdog shuts it down instead.
            .process_group(0)
            .spawn()
            .expect("spawn postgres");
        let pid = child.id();
        let pid_file = self.data_dir.join("postmaster.pid");
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = self.log_since(log_start);
                let msg = format!("postmaster exited with {status}; server log:\n{log}");
                return Err(
                    if log.contains("Address already in use")
                        || log.contains("could not create any TCP/IP sockets")
                    {
                        StartError::PortInUse(msg)
                    } else if log.contains("pre-existing shared memory block")
                        || log.contains("lock file \"postmaster.pid\" already exists")
                    {
                        StartError::Transient(msg)
                    } else {
                        StartError::Other(msg)
                    },
                );
            }
            // Line 1 is the pid, line 8 the status ("ready" or "standby"
            // once connections are accepted).
            let ready = fs::read_to_string(&pid_file).is_ok_and(|s| {
                let lines: Vec<&str> = s.lines().collect();
                lines.first().map(|l| l.trim()) == Some(pid.to_string().as_str())
                    && matches!(lines.get(7).map(|l| l.trim()), Some("ready" | "standby"))
            });
            if ready && TcpStream::connect_timeout(&self.addr(), Duration::from_secs(1)).is_ok() {
                *self.pm() = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                kill_tree(pid);
                let _ = child.wait();
                panic!(
                    "{} postmaster not ready after {STARTUP_TIMEOUT:?}; server log:\n{}",
                    self.color,
                    self.log_since(log_start)
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(&self.log_path).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_since(&self, offset: u64) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(&self.log_path) {
            let _ = f.seek(SeekFrom::Start(offset));
            let _ = f.read_to_string(&mut s);
        }
        s
    }
}

impl Drop for Cluster {
    /// Immediate shutdown, then the temp dir is removed.
    fn drop(&mut self) {
        let pid = self.postmaster_pid();
        if let Some(pid) = pid {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGQUIT) };
            if !self.wait_stopped() {
                kill_tree(pid);
                self.wait_stopped();
            }
        }
        if let Some(mut w) = self
            .watchdog
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            if fs::remove_dir_all(&self.root_dir).is_ok() {
                w.disarm();
            } else {
                w.fire(); // let the watchdog try (and retry)
            }
        }
    }
}

/// SIGKILLs a postmaster and its children. PostgreSQL puts every child in a
/// session of its own, so they are found by parent pid (Linux `/proc`;
/// elsewhere only the postmaster is killed and the children notice its death).
fn kill_tree(pid: u32) {
    let children: Vec<u32> = fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let child: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ..."; comm may contain spaces/parens.
            let ppid: u32 = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            (ppid == pid).then_some(child)
        })
        .collect();
    for child in children {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(child as libc::pid_t, libc::SIGKILL) };
    }
    // SAFETY: plain kill(2) on our own (unreaped) child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// Quotes a libpq key=value connection string value if needed.
fn quote_conn_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\', '=']) {
        return v.to_string();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

// ---------------------------------------------------------------------------
// Pair
// ---------------------------------------------------------------------------

/// The blue (current) and green (target) clusters.
pub struct ClusterPair {
    pub blue: Cluster,
    pub green: Cluster,
}

impl ClusterPair {
    /// A new pair owned by the caller (stopped and removed on drop); for
    /// tests that stop, restart or kill clusters.
    pub fn start_private() -> ClusterPair {
        let (blue, green) = thread::scope(|s| {
            let blue = s.spawn(|| Cluster::start_new("blue"));
            let green = s.spawn(|| Cluster::start_new("green"));
            (join_or_resume(blue), join_or_resume(green))
        });
        ClusterPair { blue, green }
    }

    /// Both clusters, blue first.
    pub fn both(&self) -> [&Cluster; 2] {
        [&self.blue, &self.green]
    }
}

fn join_or_resume<T>(h: thread::ScopedJoinHandle<'_, T>) -> T {
    h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// The blue/green pair shared by all tests of this test binary, started on
/// first use. Don't stop or kill these clusters (use
/// [`ClusterPair::start_private`]); they are cleaned up at process exit.
pub fn shared_pair() -> &'static ClusterPair {
    static SHARED: OnceLock<Result<ClusterPair, String>> = OnceLock::new();
    let pair = SHARED.get_or_init(|| {
        let started = Instant::now();
        let pair = std::panic::catch_unwind(ClusterPair::start_private).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".to_string())
        })?;
        eprintln!(
            "[support] shared blue/green pair ready in {:.2?}: blue port {} ({}), green port {} ({})",
            started.elapsed(),
            pair.blue.port,
            pair.blue.root_dir.display(),
            pair.green.port,
            pair.green.root_dir.display()
        );
        Ok(pair)
    });
    match pair {
        Ok(pair) => pair,
        Err(msg) => panic!("shared blue/green pair failed to start: {msg}"),
    }
}
pub mod certs;
pub mod faults;
pub mod pgshift;
pub mod wire;
