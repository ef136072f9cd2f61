//! The sandbox: model-written Python runs here and nowhere else.
//!
//! Each run gets a separate `python3` process in a fresh, private temporary directory with a clean
//! environment, and is contained by layers that do not trust each other:
//! - the kernel: a new session (so the whole process group can be killed), rlimits on address
//!   space, CPU time, file size, open files and core dumps, a new network namespace (no interface
//!   but a down loopback) where the kernel allows it, and, when collm runs as root, a throwaway
//!   user id of its own, so the code cannot write anywhere but its directory (and world-writable
//!   places), its process count is capped (fork bombs), and every process it left behind is
//!   killed at the end;
//! - the Python process: an audit hook (PEP 578) that refuses writes and deletions outside the
//!   working directory, sockets, new processes and `ctypes`, before any model-written line runs;
//! - the parent: a wall-clock timeout, and caps on the bytes of stdout and stderr it keeps (a
//!   run that prints more is killed).
//!
//! A run never fails the caller because of what the code did: [`RunResult::status`] says what
//! happened (`ok`, `timeout`, `memory`, `signal`, `error`) and [`RunResult::reason`] why.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Limits of one run.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Wall-clock time before the run is killed.
    pub timeout: Duration,
    /// Address-space limit (RLIMIT_AS), in MiB.
    pub memory_mb: u64,
    /// Bytes kept of stdout and of stderr each; a run that prints more is killed.
    pub max_output: usize,
    /// Largest file the code may write (RLIMIT_FSIZE), in MiB.
    pub max_file_mb: u64,
    /// Processes (and threads) the run's user may have at once (with a throwaway user id).
    pub max_processes: u64,
    /// Install the Python audit hook (turn off only to test the kernel's layers alone).
    pub python_guard: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            memory_mb: 1024,
            max_output: 1 << 20,
            max_file_mb: 16,
            max_processes: 32,
            python_guard: true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Timeout,
    Memory,
    Signal,
    Error,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub status: Status,
    pub exit_code: Option<i32>,
    /// The signal that ended the process, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub wall_s: f64,
    /// Why the status is not `ok`, in words.
    pub reason: Option<String>,
    /// stdout or stderr went past `max_output` (the run was killed).
    pub output_truncated: bool,
}

/// What isolation this machine allows; found once when the sandbox is made.
#[derive(Clone, Debug, Serialize)]
pub struct Isolation {
    pub python: PathBuf,
    /// Runs get a new network namespace.
    pub network_namespace: bool,
    /// Runs get a throwaway user id of their own (needs root).
    pub own_uid: bool,
    /// What could not be had, in words (printed once by the CLI and the trainer).
    pub warnings: Vec<String>,
}

pub struct Sandbox {
    pub limits: Limits,
    pub isolation: Isolation,
}

/// Runs started by this process (all sandboxes): names each run's directory.
static RUNS: AtomicU32 = AtomicU32::new(0);

/// Runs of one process that may be in progress at once, each with a uid of its own; more wait.
const UID_SLOTS: usize = 256;

static SLOTS: std::sync::Mutex<[bool; UID_SLOTS]> = std::sync::Mutex::new([false; UID_SLOTS]);
static SLOT_FREED: std::sync::Condvar = std::sync::Condvar::new();

/// A uid slot held by a run in progress; freed when dropped.
struct UidSlot(usize);

impl UidSlot {
    fn take() -> Self {
        let mut slots = SLOTS.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(i) = slots.iter().position(|&busy| !busy) {
                slots[i] = true;
                return Self(i);
            }
            slots = SLOT_FREED.wait(slots).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        SLOTS.lock().unwrap_or_else(|e| e.into_inner())[self.0] = false;
        SLOT_FREED.notify_one();
    }
}

/// The audit hook run before the code (argv: guard.py, code.py).
const GUARD: &str = r#"import os, sys
_root = os.path.realpath(os.getcwd())
_busy = [False]
_write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _inside(p):
    if isinstance(p, int):
        return True
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    p = os.path.realpath(os.path.join(os.getcwd(), os.fspath(p)))
    return p == _root or p.startswith(_root + os.sep)

def _refuse(what):
    raise PermissionError("collm sandbox: " + what + " is not allowed")

_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "os.link", "os.symlink", "os.truncate", "os.chmod",
                "os.chown", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.move", "os.chflags", "os.setxattr",
                "os.removexattr"}
_DENY = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
         "os.kill", "os.killpg", "pty.", "ctypes.", "os.setuid", "os.setgid", "os.chroot", "resource.setrlimit",
         "os.startfile", "webbrowser.", "sys.setprofile", "sys.settrace")

def _hook(event, args):
    if _busy[0]:
        return
    _busy[0] = True
    try:
        if event == "open":
            path, mode, flags = args
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & _write_flags)
            if writes and not _inside(path):
                _refuse("writing %r outside the working directory" % (path,))
        elif event in _PATH_EVENTS:
            for p in args:
                if isinstance(p, (str, bytes, os.PathLike)) and not _inside(p):
                    _refuse("%s on %r outside the working directory" % (event, p))
        elif event.startswith(_DENY):
            _refuse(event)
    finally:
        _busy[0] = False

sys.addaudithook(_hook)
del _hook
_path = sys.argv[1]
sys.argv = sys.argv[1:]
with open(_path, encoding="utf-8") as _f:
    _code = compile(_f.read(), _path, "exec")
del _f, _path
exec(_code, {"__name__": "__main__", "__builtins__": __builtins__})
"#;

impl Sandbox {
    /// Finds a Python interpreter (`python`, else `$COLLM_PYTHON`, `/usr/bin/python3`,
    /// `/usr/local/bin/python3`, the `python3` on PATH) that runs under the strongest isolation
    /// this machine allows, and notes what it could not have.
    pub fn new(limits: Limits, python: Option<&Path>) -> Result<Self> {
        let mut candidates: Vec<PathBuf> = vec![];
        if let Some(p) = python {
            candidates.push(p.to_path_buf());
        } else {
            if let Some(p) = std::env::var_os("COLLM_PYTHON") {
                candidates.push(p.into());
            }
            candidates.extend(["/usr/bin/python3", "/usr/local/bin/python3"].map(PathBuf::from));
            // A PATH python may be a shim (pyenv) that needs the caller's environment: ask it where it lives.
            if let Ok(o) = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output() {
                let p = String::from_utf8_lossy(&o.stdout).trim().to_string();
                if o.status.success() && !p.is_empty() {
                    candidates.push(p.into());
                }
            }
        }
        candidates.retain(|p| p.exists());
        if candidates.is_empty() {
            bail!("sandbox: no python3 found (tried $COLLM_PYTHON, /usr/bin/python3, /usr/local/bin/python3 and PATH); install python3 or set COLLM_PYTHON");
        }
        let root = unsafe { libc::geteuid() } == 0;
        let mut tried = vec![];
        // Strongest first: own uid + network namespace, then each alone, then neither.
        for (own_uid, netns) in [(true, true), (false, true), (true, false), (false, false)] {
            if own_uid && !root {
                continue;
            }
            for py in &candidates {
                let iso = Isolation { python: py.clone(), network_namespace: netns, own_uid, warnings: vec![] };
                let sb = Sandbox { limits: Limits { timeout: Duration::from_secs(20), ..limits.clone() }, isolation: iso };
                match sb.run_code("import json; print(json.dumps(6 * 7))") {
                    Ok(r) if r.status == Status::Ok && r.stdout.trim() == "42" => {
                        let mut isolation = sb.isolation;
                        if !netns {
                            isolation.warnings.push(
                                "the kernel refused a new network namespace: sandboxed code is kept off the network only by the Python audit hook"
                                    .into(),
                            );
                        }
                        if !own_uid {
                            isolation.warnings.push(if root {
                                format!("{} cannot run under a throwaway user id (is it in a directory only root can read?): sandboxed code runs as root, contained by rlimits and the audit hook", py.display())
                            } else {
                                "not running as root: sandboxed code runs as this user (no per-run process cap); processes it leaves are killed by process group".into()
                            });
                        }
                        return Ok(Sandbox { limits, isolation });
                    }
                    Ok(r) => tried.push(format!("{} (own uid {own_uid}, netns {netns}): {:?} {}", py.display(), r.status, r.stderr.trim())),
                    Err(e) => tried.push(format!("{} (own uid {own_uid}, netns {netns}): {e:#}", py.display())),
                }
            }
        }
        bail!("sandbox: no python3 could run a test program:\n  {}", tried.join("\n  "))
    }

    /// Runs Python source in a fresh directory.
    pub fn run_code(&self, code: &str) -> Result<RunResult> {
        self.run(&[("main.py", code.as_bytes())], "main.py")
    }

    /// Runs a Python file (copied into a fresh directory).
    pub fn run_file(&self, path: &Path) -> Result<RunResult> {
        let code = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        self.run(&[("main.py", &code)], "main.py")
    }

    /// Writes `files` into a fresh directory and runs `main` (one of them) there.
    pub fn run(&self, files: &[(&str, &[u8])], main: &str) -> Result<RunResult> {
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // A throwaway uid per run, held until the run ends: distinct across the runs of this
        // process in progress (a run's cleanup kills every process of its uid, so two live runs
        // must never share one) and, by pid, across processes.
        let slot = UidSlot::take();
        let uid = 200_000 + (pid % 7_000) * UID_SLOTS as u32 + slot.0 as u32;
        let dir = std::env::temp_dir().join(format!("collm-sandbox-{pid}-{n}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).with_context(|| format!("sandbox: creating {}", dir.display()))?;
        let result = self.run_in(&dir, uid, files, main);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            eprintln!("warning: sandbox: could not remove {}: {e}", dir.display());
        }
        result
    }

    fn run_in(&self, dir: &Path, uid: u32, files: &[(&str, &[u8])], main: &str) -> Result<RunResult> {
        for (name, body) in files {
            if name.contains('/') || name.starts_with('.') {
                bail!("sandbox: file name '{name}' must be a plain name");
            }
            std::fs::write(dir.join(name), body).with_context(|| format!("sandbox: writing {name}"))?;
        }
        std::fs::write(dir.join("_collm_guard.py"), GUARD).context("sandbox: writing the guard")?;
        let own_uid = self.isolation.own_uid;
        if own_uid {
            chown_tree(dir, uid)?;
        }
        let mut cmd = Command::new(&self.isolation.python);
        cmd.arg("-I").arg("-B").arg("-u");
        if self.limits.python_guard {
            cmd.arg("_collm_guard.py");
        }
        cmd.arg(main)
            .current_dir(dir)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", dir)
            .env("TMPDIR", dir)
            .env("LANG", "C.UTF-8")
            .env("PYTHONIOENCODING", "utf-8")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let l = self.limits.clone();
        let netns = self.isolation.network_namespace;
        let root = unsafe { libc::geteuid() } == 0;
        let cpu_s = l.timeout.as_secs() + 1;
        let (memory_mb, max_file_mb, max_processes) = (l.memory_mb, l.max_file_mb, l.max_processes);
        // SAFETY: only async-signal-safe calls (raw syscalls) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if netns {
                    let flags = if root { libc::CLONE_NEWNET } else { libc::CLONE_NEWUSER | libc::CLONE_NEWNET };
                    if libc::unshare(flags) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let mb = 1u64 << 20;
                let lims = [
                    (libc::RLIMIT_AS, memory_mb * mb),
                    (libc::RLIMIT_CPU, cpu_s),
                    (libc::RLIMIT_FSIZE, max_file_mb * mb),
                    (libc::RLIMIT_CORE, 0),
                    (libc::RLIMIT_NOFILE, 64),
                ];
                for (res, v) in lims {
                    let r = libc::rlimit { rlim_cur: v, rlim_max: v };
                    if libc::setrlimit(res, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if own_uid {
                    let r = libc::rlimit { rlim_cur: max_processes, rlim_max: max_processes };
                    // Raw syscalls: glibc's set*id wrappers synchronise threads, which a forked child has not.
                    if libc::setrlimit(libc::RLIMIT_NPROC, &r) != 0
                        || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                        || libc::syscall(libc::SYS_setgid, uid) != 0
                        || libc::syscall(libc::SYS_setuid, uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let t0 = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("sandbox: starting {}", self.isolation.python.display()))?;
        let pgid = child.id() as i32;
        let overflow = Arc::new(AtomicBool::new(false));
        let reader = |pipe: Option<Box<dyn Read + Send>>| {
            let overflow = overflow.clone();
            let cap = l.max_output;
            std::thread::spawn(move || {
                let mut kept = Vec::new();
                let Some(mut pipe) = pipe else { return kept };
                let mut buf = [0u8; 65536];
                loop {
                    match pipe.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => {
                            let room = cap.saturating_sub(kept.len());
                            kept.extend_from_slice(&buf[..k.min(room)]);
                            if k > room {
                                overflow.store(true, Ordering::SeqCst);
                                break;
                            }
                        }
                    }
                }
                kept
            })
        };
        let out_t = reader(child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        let err_t = reader(child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
        let mut timed_out = false;
        let mut sleep = Duration::from_micros(500);
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if t0.elapsed() > l.timeout {
                timed_out = true;
            }
            if timed_out || overflow.load(Ordering::SeqCst) {
                kill_all(pgid, own_uid.then_some(uid));
                break child.wait()?;
            }
            std::thread::sleep(sleep);
            sleep = (sleep * 2).min(Duration::from_millis(10));
        };
        let wall_s = t0.elapsed().as_secs_f64();
        // Whatever the code left running (children, daemons) goes too, so the pipes close.
        kill_all(pgid, own_uid.then_some(uid));
        let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
        let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
        let output_truncated = overflow.load(Ordering::SeqCst);
        let exit_code = status.code();
        let signal = status.signal();
        let (status, reason) = if timed_out {
            (Status::Timeout, Some(format!("ran past the {:.1} s wall-clock limit", l.timeout.as_secs_f64())))
        } else if output_truncated {
            (Status::Error, Some(format!("printed more than {} bytes", l.max_output)))
        } else if signal == Some(libc::SIGXCPU) {
            (Status::Timeout, Some("ran past its CPU-time limit".into()))
        } else if signal == Some(libc::SIGXFSZ) {
            (Status::Error, Some(format!("wrote a file larger than {} MiB", l.max_file_mb)))
        } else if let Some(sig) = signal {
            (Status::Signal, Some(format!("killed by signal {sig}")))
        } else if exit_code == Some(0) {
            (Status::Ok, None)
        } else if stderr.contains("MemoryError") {
            (Status::Memory, Some(format!("ran out of its {} MiB memory limit", l.memory_mb)))
        } else {
            let last = stderr.lines().rev().find(|s| !s.trim().is_empty()).unwrap_or("").trim().to_string();
            (Status::Error, Some(if last.is_empty() { format!("exit code {}", exit_code.unwrap_or(-1)) } else { last }))
        };
        Ok(RunResult { status, exit_code, signal, stdout, stderr, wall_s, reason, output_truncated })
    }
}

/// Kills the run's process group and, with a throwaway uid, every process of that uid (a process
/// that left the group with setsid is still caught).
fn kill_all(pgid: i32, uid: Option<u32>) {
    unsafe {
        libc::killpg(pgid, libc::SIGKILL);
        if let Some(uid) = uid {
            // kill(-1) as that uid reaches exactly its processes; done in a forked child that
            // drops to the uid and exits.
            let pid = libc::fork();
            if pid == 0 {
                if libc::syscall(libc::SYS_setuid, uid) == 0 {
                    libc::kill(-1, libc::SIGKILL);
                }
                libc::_exit(0);
            } else if pid > 0 {
                let mut st = 0;
                libc::waitpid(pid, &mut st, 0);
            }
        }
    }
}

fn chown_tree(dir: &Path, uid: u32) -> Result<()> {
    for p in std::iter::once(dir.to_path_buf()).chain(std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path())) {
        std::os::unix::fs::chown(&p, Some(uid), Some(uid)).with_context(|| format!("sandbox: chown {}", p.display()))?;
    }
    Ok(())
}
