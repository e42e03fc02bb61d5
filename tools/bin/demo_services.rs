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
