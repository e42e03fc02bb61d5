//! Faults that stay inside one test: a TCP proxy in front of ClickHouse that a test can cut
//! (a network partition between one service and ClickHouse) without stopping the shared
//! server other tests use.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards `127.0.0.1:<port>` to `upstream` until cut.
#[derive(Debug)]
pub struct TcpProxy {
    pub addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    epoch: watch::Sender<u64>,
    /// Connections refused or dropped while cut (evidence that the fault bit).
    refused: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(upstream: &str) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let refused = Arc::new(AtomicU64::new(0));
        let (epoch, _) = watch::channel(0u64);
        let upstream = upstream.to_owned();
        let task = {
            let (cut, refused, epoch) = (cut.clone(), refused.clone(), epoch.clone());
            tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if cut.load(Ordering::SeqCst) {
                        refused.fetch_add(1, Ordering::SeqCst);
                        drop(inbound);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let mut cut_rx = epoch.subscribe();
                    let refused = refused.clone();
                    tokio::spawn(async move {
                        let Ok(mut outbound) = TcpStream::connect(&upstream).await else { return };
                        tokio::select! {
                            _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
                            _ = cut_rx.changed() => { refused.fetch_add(1, Ordering::SeqCst); }
                        }
                    });
                }
            })
        };
        Ok(Self { addr, cut, epoch, refused, task })
    }

    /// `http://127.0.0.1:<port>` for a ClickHouse URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.epoch.send_modify(|e| *e += 1);
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    /// Connections refused or dropped while cut.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
