//! `start`: the demo's aggregator, rater and API under the testkit supervisor, like the tests
//! and the bench start theirs, but detached: they keep running after the demo (Prometheus
//! scrapes them on their default ports) until `make demo-stop`. deploy/local/demo.sh finds
//! them again by the pid files and the `METERFLOW_DEMO_STATE` marker written here.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use meterflow_testkit::procs::ServiceProc;

/// How long a service may take to report ready (keys loaded, partitions claimed).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// `name=port`, e.g. `aggregator=9101`: the binary meterflow-NAME, whose HTTP address the
/// caller's environment sets to that port (the services' defaults are the demo's).
pub fn parse_service(s: &str) -> Result<(String, u16), String> {
    let (name, port) = s.split_once('=').ok_or_else(|| format!("{s:?} is not name=port"))?;
    Ok((name.to_owned(), port.parse().map_err(|e| format!("port of {name}: {e}"))?))
}

/// Starts each service (in order), waits for its `/readyz`, and leaves it running. Fails,
/// with the end of its log, if one exits or is not ready in time (that one is killed; those
/// already started stay up for `make demo-stop`).
pub async fn start(state: &Path, services: &[(String, u16)]) -> Result<()> {
    std::fs::create_dir_all(state).with_context(|| state.display().to_string())?;
    // demo.sh compares the marker with its own path string: keep it exactly as given.
    let marker = state.display().to_string();
    for (name, port) in services {
        // Binding first gives a clear error instead of a service dying on EADDRINUSE.
        ensure!(
            std::net::TcpListener::bind(("127.0.0.1", *port)).is_ok(),
            "demo {name}: 127.0.0.1:{port} is in use; stop whatever holds it (or run 'make demo-stop')"
        );
        let log = state.join(format!("{name}.log"));
        let mut header = String::new();
        writeln!(header, "\n[meterflow] ==== demo {name} starting (pid of meterflow-demo-summary {})", std::process::id())?;
        append(&log, &header)?;
        let env = vec![("METERFLOW_DEMO_STATE".to_owned(), marker.clone()), ("NO_COLOR".to_owned(), "1".to_owned())];
        let mut proc = ServiceProc::new(&format!("meterflow-{name}"), env, log.clone())?.in_own_process_group();
        proc.start()?;
        let pid = proc.pid().context("just started")?;
        std::fs::write(state.join(format!("{name}.pid")), format!("{pid}\n"))?;
        let started = std::time::Instant::now();
        proc.wait_ready(&format!("http://127.0.0.1:{port}/readyz"), READY_TIMEOUT)
            .await
            .with_context(|| format!("demo {name} (log {})", log.display()))?;
        proc.detach();
        println!(
            "[meterflow] demo {name}: ready in {:.1} s (pid {pid}, http://127.0.0.1:{port}/metrics, log {})",
            started.elapsed().as_secs_f64(),
            log.display()
        );
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// How long a service may take to flush and checkpoint after SIGTERM before it is SIGKILLed.
const STOP_GRACE: Duration = Duration::from_secs(40);

fn pid_file(state: &Path, name: &str) -> std::path::PathBuf {
    state.join(format!("{name}.pid"))
}

/// Is `pid` the demo's meterflow-NAME, alive? Its command line and the marker in its
/// environment, because the tests run the same binaries and a pid may have been reused.
fn is_ours(state: &Path, name: &str, pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let marker = format!("METERFLOW_DEMO_STATE={}", state.display());
    let binary = format!("meterflow-{name}");
    cmdline.split(|b| *b == 0).next().is_some_and(|argv0| String::from_utf8_lossy(argv0).ends_with(&binary))
        && environ.split(|b| *b == 0).any(|e| e == marker.as_bytes())
        && stat.rsplit_once(')').is_some_and(|(_, rest)| rest.split_whitespace().next() != Some("Z"))
}

/// The pid of the demo's NAME if it runs; a stale pid file is removed.
pub fn running(state: &Path, name: &str) -> Option<u32> {
    let path = pid_file(state, name);
    let pid = std::fs::read_to_string(&path).ok()?.trim().parse().ok();
    match pid {
        Some(pid) if is_ours(state, name, pid) => Some(pid),
        _ => {
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

/// SIGTERM (the service flushes and checkpoints), SIGKILL after [`STOP_GRACE`].
pub async fn stop(state: &Path, names: &[String]) -> Result<()> {
    use rustix::process::{kill_process, Pid, Signal};
    for name in names {
        let Some(pid) = running(state, name) else {
            println!("[meterflow] demo {name}: not running");
            continue;
        };
        println!("[meterflow] demo {name}: stopping (pid {pid}; it flushes and checkpoints first)");
        let raw = Pid::from_raw(i32::try_from(pid)?).context("pid 0")?;
        kill_process(raw, Signal::TERM)?;
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while is_ours(state, name, pid) {
            if std::time::Instant::now() > deadline {
                eprintln!("[meterflow] WARNING: demo {name}: pid {pid} still running {STOP_GRACE:?} after SIGTERM, sending SIGKILL");
                kill_process(raw, Signal::KILL)?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = std::fs::remove_file(pid_file(state, name));
        println!("[meterflow] demo {name}: stopped");
    }
    Ok(())
}

/// One line per service; false if any is stopped.
pub fn status(state: &Path, services: &[(String, u16)]) -> bool {
    let mut all = true;
    for (name, port) in services {
        match running(state, name) {
            Some(pid) => println!(
                "demo {name:<11} running  pid {pid:<7} http://127.0.0.1:{port}/metrics; log {}",
                state.join(format!("{name}.log")).display()
            ),
            None => {
                println!("demo {name:<11} stopped");
                all = false;
            }
        }
    }
    all
}
