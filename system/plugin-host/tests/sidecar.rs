//! Python sidecars: the example echo plugin (python/examples/echo_plugin.py) served
//! over gRPC on a Unix socket, from the venv made by scripts/python-venv.sh.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rollout_core::traits::{CancelToken, PluginCall, PluginError, PluginHost};
use rollout_plugin_host::{
    CANCEL_GRACE, LoadError, LocalPluginHost, PluginMode, PluginSpec, SIDECAR_ABI_VERSION, SidecarSpec,
};
use tempfile::TempDir;

const SECOND: Duration = Duration::from_secs(1);

/// A host running one sidecar, `script`, on a socket in its own temp dir.
struct Sidecar {
    host: LocalPluginHost,
    _dir: TempDir,
}

fn spec_for(script: &Path, dir: &TempDir) -> PluginSpec {
    PluginSpec {
        name: "echo-py".into(),
        mode: PluginMode::Sidecar(SidecarSpec {
            program: common::venv_python(),
            args: vec![script.display().to_string()],
            python_path: None,
            socket: Some(dir.path().join("echo.sock")),
            startup_timeout: Duration::from_secs(20),
            env: Default::default(),
            secrets: Vec::new(),
        }),
    }
}

fn echo_script() -> PathBuf {
    common::workspace_root().join("python/examples/echo_plugin.py")
}

fn start_echo() -> Sidecar {
    let dir = TempDir::new().unwrap();
    let host = LocalPluginHost::start(&[spec_for(&echo_script(), &dir)]).expect("start the echo sidecar");
    Sidecar { host, _dir: dir }
}

fn call(method: &str, payload: &[u8], deadline: Duration) -> PluginCall {
    PluginCall {
        plugin: "echo-py".into(),
        method: method.into(),
        payload: payload.to_vec(),
        deadline,
        inputs: Vec::new(),
    }
}

impl Sidecar {
    fn call(&self, method: &str, payload: &[u8], deadline: Duration) -> Result<Vec<u8>, PluginError> {
        self.host.call(&call(method, payload, deadline), &CancelToken::new())
    }

    fn pid(&self) -> u32 {
        let bytes = self.call("pid", b"", SECOND * 5).expect("pid");
        String::from_utf8(bytes).unwrap().parse().unwrap()
    }

    fn starts(&self) -> u64 {
        self.host.sidecar_starts("echo-py").unwrap()
    }
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn a_handle_with_an_inputs_parameter_gets_the_tasks_input_files() {
    let sidecar = start_echo();
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("blob");
    std::fs::write(&path, b"weights").unwrap();
    let mut with_inputs = call("inputs", b"", SECOND * 5);
    with_inputs.inputs = vec![path];
    let out = sidecar.host.call(&with_inputs, &CancelToken::new()).unwrap();
    assert_eq!(String::from_utf8(out).unwrap(), format!("{} 7", rollout_core::ContentId::of(b"weights").to_hex()));
    // A two-argument call still works beside it.
    assert_eq!(sidecar.call("echo", b"x", SECOND * 5), Ok(b"x".to_vec()));
}

#[test]
fn round_trip() {
    let sidecar = start_echo();
    assert_eq!(sidecar.host.plugins(), vec!["echo-py".to_owned()]);
    assert_eq!(sidecar.call("echo", b"hello", SECOND * 5), Ok(b"hello".to_vec()));
    assert_eq!(sidecar.call("upper", b"hello", SECOND * 5), Ok(b"HELLO".to_vec()));
    let big = vec![3u8; 8 << 20];
    assert_eq!(sidecar.call("echo", &big, SECOND * 20), Ok(big));
    assert_eq!(sidecar.starts(), 1);
}

#[test]
fn an_exception_is_a_failed_call_with_its_traceback() {
    let sidecar = start_echo();
    let err = sidecar.call("fail", b"abc", SECOND * 5).unwrap_err();
    let PluginError::Failed { message, detail } = err else { panic!("expected Failed, got {err:?}") };
    assert_eq!(message, "ValueError: fail was called with 3 bytes");
    let traceback = detail.expect("a traceback");
    assert!(traceback.contains("Traceback") && traceback.contains("echo_plugin.py"), "{traceback}");
    // An exception costs the call, not the process.
    assert_eq!(sidecar.call("echo", b"x", SECOND * 5), Ok(b"x".to_vec()));
    assert_eq!(sidecar.starts(), 1);
}

#[test]
fn a_crash_fails_the_call_and_the_next_call_restarts_the_sidecar() {
    let sidecar = start_echo();
    let first = sidecar.pid();
    let err = sidecar.call("crash", b"", SECOND * 5).unwrap_err();
    assert!(matches!(err, PluginError::Crashed(ref m) if m.contains("exited")), "{err:?}");
    assert!(!alive(first), "the crashed sidecar is reaped");
    assert_eq!(sidecar.call("echo", b"again", SECOND * 10), Ok(b"again".to_vec()));
    assert_ne!(sidecar.pid(), first);
    assert_eq!(sidecar.starts(), 2);
}

#[test]
fn a_sidecar_killed_mid_call_fails_that_call_and_the_retry_succeeds() {
    let sidecar = Arc::new(start_echo());
    let victim = sidecar.pid();
    let in_flight = {
        let sidecar = Arc::clone(&sidecar);
        std::thread::spawn(move || sidecar.call("sleep", b"10000", SECOND * 30))
    };
    std::thread::sleep(Duration::from_millis(300));
    let killed = Command::new("kill").args(["-KILL", &victim.to_string()]).status().unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let err = in_flight.join().unwrap().unwrap_err();
    assert!(matches!(err, PluginError::Crashed(_)), "{err:?}");
    assert!(started.elapsed() < SECOND * 5, "the call noticed the crash after {:?}", started.elapsed());
    // The retry (the next attempt) runs on a fresh sidecar.
    assert_eq!(sidecar.call("echo", b"retry", SECOND * 10), Ok(b"retry".to_vec()));
    assert_ne!(sidecar.pid(), victim);
    assert_eq!(sidecar.starts(), 2);
}

#[test]
fn a_call_past_its_deadline_that_ignores_its_cancel_is_killed_after_the_grace_and_the_next_call_gets_a_new_one() {
    let sidecar = start_echo();
    let hung = sidecar.pid();
    let deadline = Duration::from_millis(300);
    let started = Instant::now();
    assert_eq!(sidecar.call("sleep", b"10000", deadline), Err(PluginError::DeadlineExceeded(deadline)));
    let took = started.elapsed();
    assert!(took >= deadline + CANCEL_GRACE, "killed after {took:?}, before the grace ran out");
    assert!(took < deadline + CANCEL_GRACE + SECOND * 2, "gave up after {took:?}");
    assert!(!alive(hung), "the hung sidecar was killed");
    assert_eq!(sidecar.call("echo", b"fresh", SECOND * 10), Ok(b"fresh".to_vec()));
    assert_eq!(sidecar.starts(), 2);
}

#[test]
fn a_cancelled_call_returns_cancelled() {
    let sidecar = start_echo();
    let cancel = CancelToken::new();
    let canceller = cancel.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        canceller.cancel();
    });
    assert_eq!(sidecar.host.call(&call("sleep", b"10000", SECOND * 30), &cancel), Err(PluginError::Cancelled));
    assert_eq!(sidecar.call("echo", b"after", SECOND * 10), Ok(b"after".to_vec()));
}

type Outcome = Result<Vec<u8>, PluginError>;

/// Four calls at once on one sidecar: three of `others_ms` with a long deadline, and
/// `method` of 10 s with a 300 ms deadline. Returns the four outcomes (the short one
/// first) and how long the short one took.
fn four_at_once(sidecar: &Arc<Sidecar>, method: &'static str, others_ms: u32) -> (Outcome, Duration, Vec<Outcome>) {
    let others: Vec<_> = (0..3)
        .map(|_| {
            let sidecar = Arc::clone(sidecar);
            std::thread::spawn(move || sidecar.call("sleep", others_ms.to_string().as_bytes(), SECOND * 20))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let started = Instant::now();
    let short = sidecar.call(method, b"10000", Duration::from_millis(300));
    let took = started.elapsed();
    (short, took, others.into_iter().map(|t| t.join().unwrap()).collect())
}

#[test]
fn one_of_four_calls_timing_out_and_stopping_when_cancelled_leaves_the_process_and_the_other_three_alone() {
    let sidecar = Arc::new(start_echo());
    let pid = sidecar.pid();
    let (short, took, others) = four_at_once(&sidecar, "wait", 1500);
    assert_eq!(short, Err(PluginError::DeadlineExceeded(Duration::from_millis(300))));
    assert!(took < SECOND, "the cooperative call stopped after {took:?}");
    assert!(others.iter().all(|r| r == &Ok(b"1500".to_vec())), "{others:?}");
    assert_eq!(sidecar.pid(), pid, "not killed");
    assert_eq!(sidecar.starts(), 1);
}

#[test]
fn one_of_four_calls_timing_out_and_ignoring_its_cancel_is_killed_and_the_other_three_are_re_run() {
    let sidecar = Arc::new(start_echo());
    let pid = sidecar.pid();
    // The others run 3 s, so they are in flight when the process is killed (0.3 s + grace).
    let (short, took, others) = four_at_once(&sidecar, "sleep", 3000);
    assert_eq!(short, Err(PluginError::DeadlineExceeded(Duration::from_millis(300))));
    assert!(took >= CANCEL_GRACE, "killed after {took:?}");
    assert!(!alive(pid), "the process that would not stop was killed");
    // The other three were re-run on the new process and succeeded: no error, so no
    // attempt is charged to their tasks.
    assert!(others.iter().all(|r| r == &Ok(b"3000".to_vec())), "{others:?}");
    assert_eq!(sidecar.starts(), 2);
}

#[test]
fn a_sidecar_that_keeps_crashing_is_restarted_after_a_growing_pause() {
    let sidecar = start_echo();
    let started = Instant::now();
    for _ in 0..3 {
        assert!(matches!(sidecar.call("crash", b"", SECOND * 10), Err(PluginError::Crashed(_))));
    }
    // Three crashes in a row: the restarts before the second and third paused 100 and 200 ms.
    let crashing = started.elapsed();
    assert!(crashing >= Duration::from_millis(300), "restarted in a tight loop: {crashing:?}");
    let started = Instant::now();
    assert_eq!(sidecar.call("echo", b"ok", SECOND * 10), Ok(b"ok".to_vec()));
    let after_three = started.elapsed();
    assert!(after_three >= Duration::from_millis(400), "the fourth start paused only {after_three:?}");
    assert_eq!(sidecar.starts(), 4);
    // Reported to the worker's driver, which ships it to the coordinator (status, metrics).
    assert_eq!(sidecar.host.restarts(), [("echo-py".to_owned(), 3)]);
}

fn write_script(dir: &TempDir, name: &str, body: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn a_sidecar_that_exits_at_startup_is_a_load_error_naming_the_plugin() {
    let dir = TempDir::new().unwrap();
    let script = write_script(&dir, "dies.py", "import sys\nsys.exit(7)\n");
    let err = LocalPluginHost::start(&[spec_for(&script, &dir)]).unwrap_err();
    let LoadError::SidecarStart { plugin, reason } = &err else { panic!("expected SidecarStart, got {err:?}") };
    assert_eq!(plugin, "echo-py");
    assert!(reason.contains("exited during startup") && reason.contains('7'), "{reason}");
}

#[test]
fn a_sidecar_that_never_listens_times_out_at_startup() {
    let dir = TempDir::new().unwrap();
    let script = write_script(&dir, "mute.py", "import time\ntime.sleep(60)\n");
    let mut spec = spec_for(&script, &dir);
    let PluginMode::Sidecar(sidecar) = &mut spec.mode else { unreachable!() };
    sidecar.startup_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let err = LocalPluginHost::start(&[spec]).unwrap_err();
    assert!(
        matches!(err, LoadError::SidecarStart { ref reason, .. } if reason.contains("not healthy within")),
        "{err}"
    );
    assert!(started.elapsed() < SECOND * 5);
}

#[test]
fn a_sidecar_speaking_another_abi_version_is_refused_naming_both() {
    let dir = TempDir::new().unwrap();
    let echo_dir = echo_script().parent().unwrap().display().to_string();
    let script = write_script(
        &dir,
        "future.py",
        &format!(
            "import sys\nsys.path.insert(0, {echo_dir:?})\nimport rollout_plugin.server as s\n\
             s.ABI_VERSION = {}\nimport echo_plugin\ns.serve(echo_plugin.handle)\n",
            SIDECAR_ABI_VERSION + 1
        ),
    );
    let err = LocalPluginHost::start(&[spec_for(&script, &dir)]).unwrap_err();
    assert!(
        matches!(err, LoadError::AbiMismatch { ours, theirs, .. } if ours == SIDECAR_ABI_VERSION && theirs == SIDECAR_ABI_VERSION + 1),
        "{err:?}"
    );
}

#[test]
fn stopping_the_host_stops_the_sidecar() {
    let sidecar = start_echo();
    let pid = sidecar.pid();
    drop(sidecar);
    assert!(!alive(pid), "sidecar {pid} outlived its host");
}

/// `kill -9` of the worker process (here a copy of this test binary hosting the
/// sidecar) takes the sidecar with it: its stdin pipe closes and the SDK exits. No
/// orphan goes on running calls whose tasks are already leased elsewhere.
#[test]
fn a_sidecar_dies_with_its_killed_worker_process() {
    const CHILD: &str = "ROLLOUT_SIDECAR_TEST_HOST";
    if std::env::var_os(CHILD).is_some() {
        let sidecar = start_echo();
        println!("sidecar-pid {}", sidecar.pid());
        std::thread::sleep(Duration::from_secs(120));
        return;
    }
    let mut host = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_sidecar_dies_with_its_killed_worker_process", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(host.stdout.take().unwrap());
    let pid: u32 = std::io::BufRead::lines(stdout)
        .map_while(Result::ok)
        // libtest may print "test NAME ... " on the same line first.
        .find_map(|line| line.split("sidecar-pid ").nth(1).map(|p| p.trim().parse().unwrap()))
        .expect("the host printed its sidecar's pid");
    assert!(alive(pid));
    host.kill().unwrap();
    host.wait().unwrap();
    let killed = Instant::now();
    while alive(pid) && killed.elapsed() < SECOND * 10 {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!alive(pid), "sidecar {pid} outlived its killed host by 10 s");
}

/// A sidecar sees none of the worker's ROLLOUT_* variables (secrets, the join token)
/// and talks over a socket in a fresh 0700 directory, not a guessable name in the shared
/// temp dir. (Run in a copy of this test binary whose environment holds the secrets.)
#[test]
fn a_sidecar_gets_no_worker_secrets_and_a_private_socket() {
    const CHILD: &str = "ROLLOUT_SIDECAR_ENV_TEST";
    if std::env::var_os(CHILD).is_some() {
        let spec = PluginSpec {
            name: "echo-py".into(),
            mode: PluginMode::Sidecar(SidecarSpec {
                program: common::venv_python(),
                args: vec![echo_script().display().to_string()],
                python_path: None,
                socket: None,
                startup_timeout: Duration::from_secs(20),
                env: [("MODEL".to_owned(), "small".to_owned())].into(),
                secrets: vec!["API_KEY".to_owned()],
            }),
        };
        let host = LocalPluginHost::start(&[spec]).expect("start");
        let pid: u32 = String::from_utf8(host.call(&call("pid", b"", SECOND * 5), &CancelToken::new()).unwrap())
            .unwrap()
            .parse()
            .unwrap();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let vars: Vec<String> = environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        let leaked: Vec<&String> =
            vars.iter().filter(|v| v.starts_with("ROLLOUT_") && !v.starts_with("ROLLOUT_PLUGIN_")).collect();
        let socket = vars.iter().find_map(|v| v.strip_prefix("ROLLOUT_PLUGIN_SOCKET=")).unwrap().to_owned();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(Path::new(&socket).parent().unwrap()).unwrap().permissions().mode() & 0o777;
        // Nothing but the base variables, the declared ones and the SDK's own.
        let allowed = |name: &str| {
            rollout_plugin_host::SIDECAR_BASE_ENV.contains(&name)
                || ["MODEL", "API_KEY", "PYTHONUNBUFFERED", "PYTHONPATH"].contains(&name)
                || name.starts_with("ROLLOUT_PLUGIN_")
        };
        let extra: Vec<&str> =
            vars.iter().filter_map(|v| v.split_once('=')).map(|(k, _)| k).filter(|k| !allowed(k)).collect();
        let has = |v: &str| vars.iter().any(|x| x == v);
        println!(
            "report leaked={} mode={mode:o} extra={extra:?} model={} key={}",
            leaked.len(),
            has("MODEL=small"),
            has("API_KEY=sk-test-1")
        );
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_sidecar_gets_no_worker_secrets_and_a_private_socket", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("ROLLOUT_SECRET_DB_PASSWORD", "hunter2")
        .env("ROLLOUT_JOIN_TOKEN", "rollout-join.abc.def")
        .env("ROLLOUT_SECRET_API_KEY", "sk-test-1")
        .env("WORKER_ONLY_SETTING", "not for plugins")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("report leaked=0 mode=700 extra=[] model=true key=true"), "{stdout}");
}

/// The Python SDK's own tests, including the check that its hand-written descriptor
/// matches proto/plugin.proto.
#[test]
fn python_sdk_unit_tests_pass() {
    let output = Command::new(common::venv_python())
        .args(["-m", "unittest", "discover", "-s"])
        .arg(common::workspace_root().join("python/tests"))
        .output()
        .unwrap();
    assert!(output.status.success(), "python unittest failed:\n{}", String::from_utf8_lossy(&output.stderr));
}
